//! Direct writes through Linux native AIO (`io_submit`), one at a time per context.
//!
//! A direct write that allocates blocks (the first write to a hole of a sparse volume) takes
//! ext4's inode lock exclusively. With `pwrite` the kernel holds that lock until the data is on
//! the disk, so such writes from several threads reach the disk one after another. Submitted
//! through AIO, the same write gives the lock back once the I/O is queued, and the next write's
//! allocation overlaps this one's transfer. fio, 8 jobs of 1 MiB sequential direct writes into a
//! sparse file on this kind of machine: `psync` 1.52-1.54 GB/s, `libaio` at depth 1
//! 1.95-1.98 GB/s.
//!
//! Callers still see a blocking write: [`AioContext::write_vectored_at`] submits and waits for
//! the completion before it returns, so the buffers are borrowed for exactly the call, as with
//! `pwritev`. Where the kernel offers no AIO (no `io_setup`, or `aio-max-nr` reached) the caller
//! falls back to `pwritev`.

use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;

/// `IOCB_CMD_PWRITEV` from `linux/aio_abi.h`.
const IOCB_CMD_PWRITEV: u16 = 8;

/// `struct iocb` from `linux/aio_abi.h` (64 bytes); `aio_key` and `aio_rw_flags` swap places
/// on big-endian machines.
#[repr(C)]
#[derive(Default)]
struct Iocb {
    aio_data: u64,
    #[cfg(target_endian = "little")]
    aio_key: u32,
    aio_rw_flags: i32,
    #[cfg(target_endian = "big")]
    aio_key: u32,
    aio_lio_opcode: u16,
    aio_reqprio: i16,
    aio_fildes: u32,
    aio_buf: u64,
    aio_nbytes: u64,
    aio_offset: i64,
    aio_reserved2: u64,
    aio_flags: u32,
    aio_resfd: u32,
}

/// `struct io_event` from `linux/aio_abi.h`.
#[repr(C)]
#[derive(Default)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

/// An AIO context with room for one request in flight.
pub struct AioContext {
    id: libc::c_ulong,
}

impl AioContext {
    /// A fresh context, or the kernel's reason for refusing one.
    pub fn new() -> io::Result<AioContext> {
        let mut id: libc::c_ulong = 0;
        // SAFETY: io_setup writes the new context's id into `id`, which outlives the call.
        let done = unsafe { libc::syscall(libc::SYS_io_setup, 1 as libc::c_long, &mut id) };
        if done < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(AioContext { id })
    }

    /// Writes all of `slices` to `file` at `offset` (see [`crate::direct`] for the alignment
    /// direct I/O needs), resuming after a short write; returns once the data is written.
    ///
    /// When the context itself fails (the kernel refuses a submission, or waiting for one
    /// fails), the error comes back with [`AioContext::broken`] set: nothing is in flight any
    /// more, and the caller may write the same bytes again by other means.
    pub fn write_vectored_at(
        &mut self,
        file: &File,
        mut slices: &mut [IoSlice<'_>],
        mut offset: u64,
    ) -> io::Result<()> {
        if self.broken() {
            return Err(io::Error::other("AIO context failed earlier"));
        }
        while !slices.is_empty() {
            let count = slices.len().min(super::direct::IOV_MAX);
            let written = self.write_once(file, &slices[..count], offset)?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut slices, written);
            offset += written as u64;
        }
        Ok(())
    }

    /// True once the context failed and was torn down.
    pub fn broken(&self) -> bool {
        self.id == 0
    }

    /// One `IOCB_CMD_PWRITEV`, submitted and waited for: the bytes written.
    fn write_once(
        &mut self,
        file: &File,
        slices: &[IoSlice<'_>],
        offset: u64,
    ) -> io::Result<usize> {
        let mut iocb = Iocb {
            aio_lio_opcode: IOCB_CMD_PWRITEV,
            aio_fildes: file.as_raw_fd() as u32,
            aio_buf: slices.as_ptr() as u64,
            aio_nbytes: slices.len() as u64,
            aio_offset: offset as i64,
            ..Iocb::default()
        };
        self.submit(&mut iocb)?;
        let res = self.wait()?;
        // The write's own outcome: bytes written, or why the kernel refused them.
        usize::try_from(res).map_err(|_| io::Error::from_raw_os_error(res.saturating_neg() as i32))
    }

    /// Submits one request; on failure the context is torn down.
    fn submit(&mut self, iocb: &mut Iocb) -> io::Result<()> {
        let mut list = [iocb as *mut Iocb];
        loop {
            // SAFETY: the iocb and the iovecs it points to (`IoSlice` is ABI-compatible with
            // `iovec`) outlive the request: `write_once` waits for its completion, or the
            // context is destroyed, which waits for it, before the borrows end.
            let submitted = unsafe {
                libc::syscall(
                    libc::SYS_io_submit,
                    self.id,
                    1 as libc::c_long,
                    list.as_mut_ptr(),
                )
            };
            let e = match submitted {
                1 => return Ok(()),
                0 => io::Error::from(io::ErrorKind::WouldBlock),
                _ => io::Error::last_os_error(),
            };
            if e.kind() != io::ErrorKind::Interrupted {
                self.destroy();
                return Err(e);
            }
        }
    }

    /// Waits for the one request in flight: its result (bytes, or a negated errno). On failure
    /// the context is torn down, which waits for the request.
    fn wait(&mut self) -> io::Result<i64> {
        let mut event = IoEvent::default();
        loop {
            // SAFETY: room for exactly the one event asked for; no timeout.
            let got = unsafe {
                libc::syscall(
                    libc::SYS_io_getevents,
                    self.id,
                    1 as libc::c_long,
                    1 as libc::c_long,
                    &mut event,
                    std::ptr::null_mut::<libc::timespec>(),
                )
            };
            let e = match got {
                1 => return Ok(event.res),
                n if n < 0 => io::Error::last_os_error(),
                _ => io::Error::other("io_getevents returned without the write's completion"),
            };
            if e.kind() != io::ErrorKind::Interrupted {
                self.destroy();
                return Err(e);
            }
        }
    }

    fn destroy(&mut self) {
        if self.id != 0 {
            // SAFETY: the id came from io_setup and is destroyed once.
            unsafe { libc::syscall(libc::SYS_io_destroy, self.id) };
            self.id = 0;
        }
    }
}

impl Drop for AioContext {
    fn drop(&mut self) {
        self.destroy();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::direct::AlignedBuf;
    use std::fs::OpenOptions;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};

    #[test]
    fn vectored_direct_writes_land_and_a_refused_one_leaves_the_context_usable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("volume");
        let buffered = tideline_testkit::sized_file(&path, 4 << 20);
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path);
        let context = AioContext::new();
        let missing = [
            direct
                .as_ref()
                .err()
                .map(|e| format!("O_DIRECT on {}: {e}", path.display())),
            context
                .as_ref()
                .err()
                .map(|e| format!("an AIO context: {e}")),
        ];
        if !tideline_testkit::skip_or_fail(missing.into_iter().flatten().collect()) {
            return;
        }
        let (direct, mut context) = (direct.unwrap(), context.unwrap());
        let mut data = AlignedBuf::zeroed(3 << 20);
        data.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i % 251) as u8);
        // Two pieces in reverse order, into a hole past the file's first MiB.
        let (first, second) = data.split_at(1 << 20);
        let mut slices = [IoSlice::new(second), IoSlice::new(first)];
        context
            .write_vectored_at(&direct, &mut slices, 1 << 20)
            .unwrap();
        let mut back = vec![0u8; 3 << 20];
        buffered.read_exact_at(&mut back, 1 << 20).unwrap();
        assert!(back[..2 << 20] == *second && back[2 << 20..] == *first);

        // A buffer direct I/O cannot take is the write's error, not the context's.
        let mut unaligned = [IoSlice::new(&data[1..4097])];
        let refused = context
            .write_vectored_at(&direct, &mut unaligned, 0)
            .unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::EINVAL), "{refused}");
        assert!(!context.broken());
        context
            .write_vectored_at(&direct, &mut [IoSlice::new(&data[..4096])], 0)
            .unwrap();
        let mut block = vec![0u8; 4096];
        buffered.read_exact_at(&mut block, 0).unwrap();
        assert!(block == data[..4096]);
    }

    #[test]
    fn a_submission_the_kernel_refuses_breaks_the_context_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("volume");
        tideline_testkit::sized_file(&path, 1 << 20);
        let read_only = std::fs::File::open(&path).unwrap();
        let Ok(mut context) = AioContext::new() else {
            let why = vec!["an AIO context".to_owned()];
            assert!(!tideline_testkit::skip_or_fail(why));
            return;
        };
        let data = AlignedBuf::zeroed(4096);
        let err = context
            .write_vectored_at(&read_only, &mut [IoSlice::new(&data)], 0)
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{err}");
        assert!(context.broken());
        let again = context
            .write_vectored_at(&read_only, &mut [IoSlice::new(&data)], 0)
            .unwrap_err();
        assert!(again.to_string().contains("failed earlier"), "{again}");
    }
}
