//! Times on the command line: RFC 3339 with up to nanosecond fractions, always shown in UTC.

use anyhow::Context;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub fn parse(text: &str) -> anyhow::Result<i64> {
    let when = OffsetDateTime::parse(text, &Rfc3339).with_context(|| {
        format!("{text:?} is not an RFC 3339 time such as 2026-11-22T10:15:30.123456789Z")
    })?;
    i64::try_from(when.unix_timestamp_nanos()).context("time out of range")
}

pub fn format(ns: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns))
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("{ns} ns"))
}

pub fn now_ns() -> i64 {
    tideline_core::TimeNs::now().0
}
