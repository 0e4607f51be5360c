//! Keeps a rebuild from filling the page cache with what it writes.
//!
//! A rebuild writes its store once, front to back: at 10 M events about 24 GB (the value file, the
//! store file, the index build's sorted runs) on a machine with 24 GB of memory, while it reads a
//! 12 GB log. Left alone, the kernel keeps every page written until memory is full, and from then
//! on each write also pays for finding room among gigabytes of dirty and just-written pages: the
//! last third of a 10 M-event rebuild ran about a third slower than the first (docs/performance.md,
//! tenth session). A rebuild reads back little of what it wrote (a resource's earlier version now
//! and then, mostly still in redb's own cache), so once a page is on disk it is dropped.
//!
//! A helper thread asks the kernel, once a [`TICK`], to drop the cached pages of the rebuild's files
//! (`posix_fadvise(POSIX_FADV_DONTNEED)`). That starts the writeback of their dirty pages and drops
//! the clean ones: those written back since the tick before. It is advice only: nothing is lost or
//! made durable by it, and a failed writeback is still reported to the store's own syncs, which
//! hold their own file descriptions.

use std::fs::File;
#[cfg(target_os = "linux")]
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

/// How often the rebuild's pages are dropped: about 250 MB written in between at full speed.
const TICK: Duration = Duration::from_secs(1);

/// The helper thread; stopped and joined when dropped.
pub(crate) struct DropBehind {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DropBehind {
    /// Drops the pages of `files`, and of every file in `dir`, once a tick from now on. A file that
    /// cannot be opened is left alone.
    pub(crate) fn start(files: &[&Path], dir: &Path) -> DropBehind {
        Self::start_every(TICK, files, dir)
    }

    fn start_every(tick: Duration, files: &[&Path], dir: &Path) -> DropBehind {
        let files: Vec<File> = files.iter().filter_map(|p| File::open(p).ok()).collect();
        let dir = dir.to_path_buf();
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("cairn-drop-behind".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(tick) {
                    for file in &files {
                        drop_cached(file);
                    }
                    for file in files_in(&dir) {
                        drop_cached(&file);
                    }
                }
            })
            .ok();
        DropBehind { stop: Some(stop), thread }
    }
}

impl Drop for DropBehind {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn files_in(dir: &Path) -> impl Iterator<Item = File> {
    std::fs::read_dir(dir).into_iter().flatten().flatten().filter_map(|entry| File::open(entry.path()).ok())
}

/// Advice: the kernel may refuse it or act on part of it, which costs time, never data.
#[cfg(target_os = "linux")]
fn drop_cached(file: &File) {
    // SAFETY: a system call on a file descriptor `file` owns for the whole call; no memory is passed.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// Elsewhere the page cache is left to the kernel (Cairn is built and measured on Linux).
#[cfg(not(target_os = "linux"))]
fn drop_cached(_: &File) {}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::Write;

    /// How many of `path`'s pages are in the page cache (`mincore` over a mapping of it).
    fn cached_pages(path: &Path) -> usize {
        let file = File::open(path).unwrap();
        let len = file.metadata().unwrap().len() as usize;
        let page = 4096;
        let mut resident = vec![0u8; len.div_ceil(page)];
        // SAFETY: a read-only shared mapping of `len` bytes of an open file, unmapped before
        // returning; `resident` has a byte for each of its pages, as mincore needs.
        unsafe {
            let at = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0);
            assert_ne!(at, libc::MAP_FAILED);
            assert_eq!(libc::mincore(at, len, resident.as_mut_ptr()), 0);
            libc::munmap(at, len);
        }
        resident.iter().filter(|&&b| b & 1 == 1).count()
    }

    /// Needs a temporary directory on a disk-backed file system (tmpfs keeps every page).
    #[test]
    fn a_rebuilds_written_pages_leave_the_page_cache_and_its_bytes_stay() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = dir.path().join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        let bytes: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
        let (named, in_dir) = (dir.path().join("named"), scratch.join("run-1"));
        for path in [&named, &in_dir] {
            let mut file = File::create(path).unwrap();
            file.write_all(&bytes).unwrap();
            file.sync_all().unwrap();
            assert!(cached_pages(path) > 1000, "just written, its pages are cached");
        }
        // A file that is not named stays cached.
        let other = dir.path().join("other");
        std::fs::write(&other, &bytes).unwrap();
        File::open(&other).unwrap().sync_all().unwrap();

        let helper = DropBehind::start_every(Duration::from_millis(20), &[&named], &scratch);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while cached_pages(&named) + cached_pages(&in_dir) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(cached_pages(&named), 0, "the named file's pages were dropped");
        assert_eq!(cached_pages(&in_dir), 0, "so were those of the file in the directory");
        assert!(cached_pages(&other) > 1000, "another file's were not");
        // Dropping stops the helper (joined), and the files read back whole from the disk.
        drop(helper);
        assert_eq!(std::fs::read(&named).unwrap(), bytes);
        assert_eq!(std::fs::read(&in_dir).unwrap(), bytes);
    }
}
