//! Keeps a rebuild from filling the page cache with what it writes.
//!
//! A rebuild writes its store once, front to back: at 10 M events about 24 GB (the value file, the
//! store file, the index build's sorted runs) on a machine with 24 GB of memory, while it reads a
//! 12 GB log. Left alone, the kernel keeps every page written until memory is full, and from then
//! on each write also pays for finding room among gigabytes of dirty and just-written pages: the
//! last third of a 10 M-event rebuild ran about a third slower than the first (docs/performance.md,
//! tenth session). Once a page is on disk it is dropped: a rebuild reads back few of its records (a
//! resource's earlier version now and then; redb's pages mostly from its own cache), and its sorted
//! runs once each, in the merge, from the disk.
//!
//! A helper thread asks the kernel, once a tick, to drop the cached pages of the rebuild's files
//! (`posix_fadvise(POSIX_FADV_DONTNEED)`). That starts the writeback of their dirty pages, which the
//! kernel could have done on its own at any time, and drops the clean ones: those written back
//! since the tick before. It is advice only: it loses nothing and makes nothing durable that a sync
//! did not. A failed writeback is still reported by the next sync through a file description opened
//! before it: the store's own syncs of its two files, and the sorter's sync of each run before it
//! reads it back (`sorter.rs`).

use std::fs::File;
#[cfg(target_os = "linux")]
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

/// The helper thread; stopped and joined when dropped.
pub(crate) struct DropBehind {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DropBehind {
    /// Drops the pages of `files`, and of every file in `dir`, once every `tick` from now on. A
    /// file that cannot be opened is left alone, and so is everything if the thread cannot be
    /// started: either costs time, never data.
    pub(crate) fn start(tick: Duration, files: &[&Path], dir: &Path) -> DropBehind {
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

/// The files in `dir` now: the index build's sorted runs come and go, so they are listed (and
/// opened) again at each tick; a few dozen at most.
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
        if len == 0 {
            return 0;
        }
        // SAFETY: sysconf reads a constant of the system.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap();
        let mut resident = vec![0u8; len.div_ceil(page)];
        // SAFETY: a read-only shared mapping of `len` bytes of an open file, unmapped before
        // returning; `resident` has a byte for each of its pages, as mincore needs; no page is read.
        unsafe {
            let at = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0);
            assert_ne!(at, libc::MAP_FAILED);
            assert_eq!(libc::mincore(at, len, resident.as_mut_ptr()), 0);
            libc::munmap(at, len);
        }
        resident.iter().filter(|&&b| b & 1 == 1).count()
    }

    fn write_synced(path: &Path, bytes: &[u8]) {
        let mut file = File::create(path).unwrap();
        file.write_all(bytes).unwrap();
        file.sync_all().unwrap();
    }

    /// Waits until none of `paths`' pages is cached, for up to ten seconds.
    fn until_dropped(paths: &[&Path]) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while paths.iter().map(|p| cached_pages(p)).sum::<usize>() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_rebuilds_written_pages_leave_the_page_cache_and_its_bytes_stay() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
        // A file system that keeps every page (tmpfs) ignores the advice: nothing to check there.
        let probe = dir.path().join("probe");
        write_synced(&probe, &bytes);
        drop_cached(&File::open(&probe).unwrap());
        if cached_pages(&probe) > 0 {
            eprintln!("skipped: {} keeps advised pages cached (tmpfs?)", dir.path().display());
            return;
        }

        let scratch = dir.path().join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        let (named, in_dir, growing) = (dir.path().join("named"), scratch.join("run-1"), dir.path().join("growing"));
        for path in [&named, &in_dir] {
            write_synced(path, &bytes);
            assert!(cached_pages(path) > 100, "just written, its pages are cached");
        }
        File::create(&growing).unwrap();
        // A file that is not named stays cached.
        let other = dir.path().join("other");
        write_synced(&other, &bytes);

        let helper = DropBehind::start(Duration::from_millis(20), &[&named, &growing], &scratch);
        until_dropped(&[&named, &in_dir]);
        assert_eq!(cached_pages(&named), 0, "the named file's pages were dropped");
        assert_eq!(cached_pages(&in_dir), 0, "so were those of the file in the directory");
        assert!(cached_pages(&other) > 100, "another file's were not");

        // Written while the helper runs, never synced (as a rebuild writes): its dirty pages go to
        // the disk and then leave the cache, and it reads back whole.
        let mut writer = std::fs::OpenOptions::new().append(true).open(&growing).unwrap();
        for piece in bytes.chunks(256 << 10) {
            writer.write_all(piece).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        until_dropped(&[&growing]);
        assert_eq!(cached_pages(&growing), 0, "written back, then dropped");
        // Dropping stops the helper (joined), and the files read back whole from the disk.
        drop(helper);
        assert_eq!(std::fs::read(&growing).unwrap(), bytes);
        assert_eq!(std::fs::read(&named).unwrap(), bytes);
        assert_eq!(std::fs::read(&in_dir).unwrap(), bytes);
    }
}
