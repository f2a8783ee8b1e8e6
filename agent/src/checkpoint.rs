//! Checkpoints: named points in a group's journal, optionally taken with the application
//! quiesced by the operator's hooks.
//!
//! Order: run the pre-checkpoint hook (e.g. `fsfreeze -f /mnt/data`, or `psql -c CHECKPOINT`);
//! flush every volume of the group (fsync of each backing file, then the spool); append the
//! `Checkpoint` record and fsync the spool; run the post-checkpoint hook (`fsfreeze -u ...`).
//! A failing pre hook fails the checkpoint and nothing is recorded (the post hook still runs,
//! to undo a partial quiesce). A failing post hook fails the request although the record
//! exists, because the application may still be frozen and the operator must know.
//! Hooks run with `sh -c` and see TIDELINE_GROUP and TIDELINE_CHECKPOINT in their environment.

use std::process::Command;

use tideline_core::record::RecordKind;
use tideline_core::spool::SpoolOp;
use tideline_core::{CheckpointName, Seq, TimeNs};

use crate::group::Group;

/// Shell commands run around an app-consistent checkpoint.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    pub pre: Option<String>,
    pub post: Option<String>,
}

fn run_hook(
    which: &str,
    command: &str,
    group: &Group,
    name: &CheckpointName,
) -> Result<(), String> {
    let output = Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("TIDELINE_GROUP", group.name.as_str())
        .env("TIDELINE_CHECKPOINT", name.as_str())
        .output()
        .map_err(|e| format!("{which} hook `{command}` could not start: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(format!(
        "{which} hook `{command}` failed ({}): {}",
        output.status,
        stderr.trim().chars().take(500).collect::<String>()
    ))
}

/// Takes a checkpoint as the module documentation describes; returns its record's seq and time.
pub fn take(
    group: &Group,
    name: &CheckpointName,
    app_consistent: bool,
    hooks: &Hooks,
) -> Result<(Seq, TimeNs), String> {
    let (pre, post) = if app_consistent {
        (hooks.pre.as_deref(), hooks.post.as_deref())
    } else {
        (None, None)
    };
    if let Some(command) = pre {
        if let Err(e) = run_hook("pre-checkpoint", command, group, name) {
            if let Some(post) = post {
                let _ = run_hook("post-checkpoint", post, group, name);
            }
            return Err(e);
        }
    }
    let recorded = record(group, name, app_consistent);
    let post_result = post.map_or(Ok(()), |command| {
        run_hook("post-checkpoint", command, group, name)
    });
    let (seq, time) = recorded?;
    post_result.map_err(|e| {
        format!("checkpoint recorded at {seq}, but {e}; the application may still be quiesced")
    })?;
    tracing::info!(group = %group.name, checkpoint = %name, seq = seq.0, app_consistent, "checkpoint taken");
    Ok((seq, time))
}

fn record(
    group: &Group,
    name: &CheckpointName,
    app_consistent: bool,
) -> Result<(Seq, TimeNs), String> {
    let volumes = group.lock().len();
    for index in 0..volumes {
        group
            .flush(index)
            .map_err(|e| format!("flush before checkpoint: {e}"))?;
    }
    let kind = RecordKind::Checkpoint {
        name: name.clone(),
        app_consistent,
    };
    group
        .spool
        .append_durable(SpoolOp::Other(kind))
        .map_err(|e| e.to_string())
}
