//! The NBD face of a protected volume: every call goes through its group's journal.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;

use crate::group::{Change, Group};
use crate::nbd::BlockExport;

pub struct VolumeExport {
    group: Arc<Group>,
    index: usize,
    size_bytes: u64,
    read_handle: std::fs::File,
}

impl VolumeExport {
    pub fn new(group: Arc<Group>, index: usize) -> io::Result<VolumeExport> {
        let (size_bytes, read_handle) = {
            let volumes = group.lock();
            (volumes[index].size_bytes, volumes[index].file.try_clone()?)
        };
        Ok(VolumeExport {
            group,
            index,
            size_bytes,
            read_handle,
        })
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size_bytes => Ok(()),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    fn change(&self, offset: u64, change: Change, fua: bool) -> io::Result<()> {
        self.group.journalled(self.index, offset, change)?;
        if fua {
            self.group.flush(self.index)?;
        }
        Ok(())
    }
}

impl BlockExport for VolumeExport {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read(&self, offset_bytes: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset_bytes, buf.len() as u64)?;
        // Reads need no journal order: a read racing a write may see either, as on a disk.
        self.read_handle.read_exact_at(buf, offset_bytes)
    }

    fn write(&self, offset_bytes: u64, data: Bytes, fua: bool) -> io::Result<()> {
        if offset_bytes
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > self.size_bytes)
        {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        if data.is_empty() {
            return Ok(());
        }
        self.change(offset_bytes, Change::Write(data), fua)
    }

    fn trim(&self, offset_bytes: u64, len_bytes: u64, fua: bool) -> io::Result<()> {
        self.check_range(offset_bytes, len_bytes)?;
        if len_bytes == 0 {
            return Ok(());
        }
        self.change(offset_bytes, Change::Trim(len_bytes), fua)
    }

    fn write_zeroes(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        fua: bool,
        may_punch: bool,
    ) -> io::Result<()> {
        self.check_range(offset_bytes, len_bytes)?;
        if len_bytes == 0 {
            return Ok(());
        }
        self.change(
            offset_bytes,
            Change::Zero {
                len_bytes,
                may_punch,
            },
            fua,
        )
    }

    fn flush(&self) -> io::Result<()> {
        Ok(self.group.flush(self.index)?)
    }

    fn change_waits_on_disk(&self, offset_bytes: u64, len_bytes: u64) -> bool {
        self.group
            .change_waits_on_disk(self.index, offset_bytes, len_bytes)
    }

    fn block_status(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<Vec<(u64, bool)>> {
        self.check_range(offset_bytes, len_bytes)?;
        let end = offset_bytes + len_bytes;
        let extents = crate::group::allocated_extents_in(&self.read_handle, offset_bytes, end)?;
        let mut runs = Vec::new();
        let mut pos = offset_bytes;
        for (start, stop) in extents
            .into_iter()
            .filter(|&(s, e)| e > offset_bytes && s < end)
        {
            let (start, stop) = (start.max(offset_bytes), stop.min(end));
            if start > pos {
                runs.push((start - pos, true));
            }
            runs.push((stop - start, false));
            pos = stop;
        }
        if pos < end {
            runs.push((end - pos, true));
        }
        Ok(runs)
    }
}
