//! An external sort of byte keys: what a rebuild uses to write an index in key order.
//!
//! Why: inserting keys into a copy-on-write B-tree in random order rewrites a page per key, and a
//! rebuild's index keys arrive in log order, which for an index by patient and date is random.
//! Sorted, the same keys fill the index page after page. Keys are gathered in memory up to a
//! budget; a full buffer is sorted and spilled to a run file; the runs are merged at the end.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// Gathers keys, then hands them back in byte order ([`KeySorter::finish`]). Duplicates are kept.
pub struct KeySorter {
    dir: PathBuf,
    name: String,
    budget: usize,
    /// The keys gathered since the last spill, back to back, and each one's place in `data`.
    data: Vec<u8>,
    spans: Vec<(u32, u32)>,
    /// The run files, each with the handle it was written through.
    runs: Vec<(PathBuf, File)>,
    len: u64,
}

impl KeySorter {
    /// A sorter that keeps up to `budget` bytes of keys in memory and spills to run files named
    /// after `name` in `dir` (which must exist; the runs are deleted as they are read).
    pub fn new(dir: &Path, name: &str, budget: usize) -> KeySorter {
        // Offsets into the buffer are u32.
        let budget = budget.clamp(1 << 10, u32::MAX as usize / 2);
        KeySorter {
            dir: dir.to_path_buf(),
            name: name.to_owned(),
            budget,
            // The whole budget up front (reserved, not touched): grown by doubling instead, the
            // buffer was copied and fresh pages zeroed again at every step.
            data: Vec::with_capacity(budget),
            spans: Vec::new(),
            runs: Vec::new(),
            len: 0,
        }
    }

    pub fn push(&mut self, key: &[u8]) -> io::Result<()> {
        if self.data.len() + key.len() > self.budget && !self.spans.is_empty() {
            self.spill()?;
        }
        self.spans.push((self.data.len() as u32, key.len() as u32));
        self.data.extend_from_slice(key);
        self.len += 1;
        Ok(())
    }

    /// How many keys were pushed.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn sort_buffer(&mut self) {
        sort_spans(&self.data, &mut self.spans);
    }

    fn spill(&mut self) -> io::Result<()> {
        self.sort_buffer();
        let path = self.dir.join(format!("{}.{}.run", self.name, self.runs.len()));
        let mut out = BufWriter::with_capacity(1 << 20, File::create(&path)?);
        for &(at, len) in &self.spans {
            out.write_all(&len.to_le_bytes())?;
            out.write_all(&self.data[at as usize..(at + len) as usize])?;
        }
        // Not synced here: after a crash the rebuild starts again and the runs are thrown away.
        let file = out.into_inner().map_err(|e| e.into_error())?;
        self.runs.push((path, file));
        self.data.clear();
        self.spans.clear();
        Ok(())
    }

    /// Every key pushed, in byte order.
    pub fn finish(mut self) -> io::Result<SortedKeys> {
        if self.runs.is_empty() {
            self.sort_buffer();
            return Ok(SortedKeys(Source::Memory { data: self.data, spans: self.spans.into_iter() }));
        }
        if !self.spans.is_empty() {
            self.spill()?;
        }
        let mut runs = Vec::with_capacity(self.runs.len());
        let mut heads = BinaryHeap::with_capacity(self.runs.len());
        for (n, (path, written)) in self.runs.iter().enumerate() {
            // Synced before it is read back, through the handle it was written with: a failed
            // writeback is reported here, not read back as other bytes once the run's pages left
            // the cache (a rebuild drops them: drop_behind.rs). Written back long before, by now.
            written.sync_data()?;
            let mut run = Run { path: path.clone(), reader: BufReader::with_capacity(256 << 10, File::open(path)?) };
            if let Some(key) = run.next_key()? {
                heads.push(Reverse((key, n)));
            }
            runs.push(run);
        }
        Ok(SortedKeys(Source::Merge { runs, heads }))
    }
}

/// Sorts `spans` (places of keys in `data`) by their keys' bytes. A comparison sort through the
/// spans reads two keys from all over `data` for every comparison: a cache miss each, and index keys
/// share long prefixes (`Patient/…`, then the type), so memcmp runs far before they differ. Here the
/// spans are sorted by seven bytes of their keys held beside them, from where the keys start to
/// differ; only keys equal in those bytes are sorted again, by the next bytes where they differ,
/// and such a group is small enough to stay in the cache.
fn sort_spans(data: &[u8], spans: &mut Vec<(u32, u32)>) {
    let mut entries: Vec<Entry> = spans.iter().map(|&(at, len)| Entry { chunk: 0, at, len }).collect();
    sort_entries(data, &mut entries);
    spans.clear();
    spans.extend(entries.iter().map(|e| (e.at, e.len)));
}

/// A key's place in the buffer, and seven of its bytes (at a depth the sort chose), big-endian, with
/// how many of them the key has (0-7) in the low byte: so that a key ending inside the seven sorts
/// before a longer key that has zeros there, and equal chunks whose count is below seven mean equal
/// keys.
struct Entry {
    chunk: u64,
    at: u32,
    len: u32,
}

impl Entry {
    fn key<'d>(&self, data: &'d [u8]) -> &'d [u8] {
        &data[self.at as usize..(self.at + self.len) as usize]
    }
}

const CHUNK: usize = 7;

/// Sorts `entries`. Groups still to sort wait on a stack of their own rather than in recursion: a
/// group goes seven bytes deeper each time, and a long key (an identifier) would go deep.
fn sort_entries(data: &[u8], entries: &mut [Entry]) {
    // (start, end, depth): entries[start..end] have keys equal before `depth`.
    let mut groups = vec![(0, entries.len(), 0)];
    while let Some((start, end, depth)) = groups.pop() {
        let group = &mut entries[start..end];
        if group.len() < 2 {
            continue;
        }
        // Bytes every key here shares from `depth` on need not be looked at again and again.
        let first = &group[0].key(data)[depth.min(group[0].len as usize)..];
        let mut shared = first.len();
        for e in &group[1..] {
            let rest = &e.key(data)[depth.min(e.len as usize)..];
            shared = first[..shared].iter().zip(rest).take_while(|(a, b)| a == b).count();
            if shared == 0 {
                break;
            }
        }
        let depth = depth + shared;
        for e in group.iter_mut() {
            let rest = e.key(data).get(depth..).unwrap_or(&[]);
            let n = rest.len().min(CHUNK);
            let mut bytes = [0u8; 8];
            bytes[..n].copy_from_slice(&rest[..n]);
            bytes[CHUNK] = n as u8;
            e.chunk = u64::from_be_bytes(bytes);
        }
        group.sort_unstable_by_key(|e| e.chunk);
        let mut at = 0;
        while at < group.len() {
            let chunk = group[at].chunk;
            let same = group[at..].iter().take_while(|e| e.chunk == chunk).count();
            // Fewer than seven bytes left means these keys ended here, equal.
            if same > 1 && (chunk & 0xff) as usize == CHUNK {
                groups.push((start + at, start + at + same, depth + CHUNK));
            }
            at += same;
        }
    }
}

struct Run {
    path: PathBuf,
    reader: BufReader<File>,
}

impl Run {
    fn next_key(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut len = [0u8; 4];
        match self.reader.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                // The run is used up: its file is no longer needed.
                std::fs::remove_file(&self.path)?;
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
        let mut key = vec![0; u32::from_le_bytes(len) as usize];
        self.reader.read_exact(&mut key)?;
        Ok(Some(key))
    }
}

/// The keys of a [`KeySorter`] in byte order: from memory, or merged from its runs.
pub struct SortedKeys(Source);

enum Source {
    Memory { data: Vec<u8>, spans: std::vec::IntoIter<(u32, u32)> },
    Merge { runs: Vec<Run>, heads: BinaryHeap<Reverse<(Vec<u8>, usize)>> },
}

impl Iterator for SortedKeys {
    type Item = io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.0 {
            Source::Memory { data, spans } => {
                spans.next().map(|(at, len)| Ok(data[at as usize..(at + len) as usize].to_vec()))
            }
            Source::Merge { runs, heads } => {
                let Reverse((key, n)) = heads.pop()?;
                match runs[n].next_key() {
                    Ok(Some(next)) => heads.push(Reverse((next, n))),
                    Ok(None) => {}
                    Err(e) => return Some(Err(e)),
                }
                Some(Ok(key))
            }
        }
    }
}

/// The keys of `added` less those of `removed`, counted: a key comes out (once) when `added` holds
/// it more often than `removed`. In byte order. For keys put in a set and taken out again: what the
/// set holds in the end.
pub fn difference(added: SortedKeys, removed: SortedKeys) -> Difference {
    Difference { added: Ahead { keys: added, head: None }, removed: Ahead { keys: removed, head: None } }
}

pub struct Difference {
    added: Ahead,
    removed: Ahead,
}

/// Sorted keys with the next one read ahead.
struct Ahead {
    keys: SortedKeys,
    head: Option<Vec<u8>>,
}

impl Ahead {
    /// The next key, taken if `wanted` says so (else left for the next call).
    fn take_if(&mut self, wanted: impl Fn(&[u8]) -> bool) -> io::Result<Option<Vec<u8>>> {
        if self.head.is_none() {
            self.head = self.keys.next().transpose()?;
        }
        Ok(self.head.take_if(|key| wanted(key)))
    }
}

impl Difference {
    fn next_key(&mut self) -> io::Result<Option<Vec<u8>>> {
        while let Some(key) = self.added.take_if(|_| true)? {
            let mut adds = 1u64;
            while self.added.take_if(|k| k == key.as_slice())?.is_some() {
                adds += 1;
            }
            let mut removes = 0u64;
            while let Some(removed) = self.removed.take_if(|k| k <= key.as_slice())? {
                removes += u64::from(removed == key);
            }
            if adds > removes {
                return Ok(Some(key));
            }
        }
        Ok(None)
    }
}

impl Iterator for Difference {
    type Item = io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_key().transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(keys: &[Vec<u8>], budget: usize) -> (Vec<Vec<u8>>, usize) {
        let dir = tempfile::tempdir().unwrap();
        let mut sorter = KeySorter::new(dir.path(), "t", budget);
        for k in keys {
            sorter.push(k).unwrap();
        }
        assert_eq!(sorter.len(), keys.len() as u64);
        let runs = sorter.runs.len();
        let out: Vec<Vec<u8>> = sorter.finish().unwrap().map(Result::unwrap).collect();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "every run file is deleted once read");
        (out, runs)
    }

    #[test]
    fn keys_come_back_in_byte_order_from_memory_and_from_spilled_runs() {
        // A scrambled mix of lengths, shared prefixes and duplicates.
        let mut keys: Vec<Vec<u8>> = (0u32..5000)
            .map(|i| {
                let n = i.wrapping_mul(2_654_435_761) % 1777;
                let mut k = format!("Patient/{}", n % 97).into_bytes();
                k.extend_from_slice(&n.to_be_bytes()[..(n % 5) as usize]);
                k
            })
            .collect();
        keys.push(Vec::new());
        let mut expected = keys.clone();
        expected.sort();

        let (in_memory, runs) = sorted(&keys, 1 << 20);
        assert_eq!(runs, 0);
        assert_eq!(in_memory, expected);

        let (merged, runs) = sorted(&keys, 1 << 10);
        assert!(runs > 10, "the small budget spilled {runs} runs");
        assert_eq!(merged, expected);
    }

    /// The sort by chunks equals a plain byte-order sort, for the keys it could get wrong: keys that
    /// are prefixes of others, zero bytes where a shorter key ends (the padding), shared prefixes
    /// longer than one or several chunks, duplicates, and the empty key.
    #[test]
    fn chunked_sort_equals_byte_order() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..200 {
            let shared: Vec<u8> = (0..next(30)).map(|_| b"Pa\0t"[next(4) as usize]).collect();
            let keys: Vec<Vec<u8>> = (0..next(400) + round % 3)
                .map(|_| {
                    let mut k = shared[..next(shared.len() as u64 + 1) as usize].to_vec();
                    // Few distinct bytes, zeros among them, so that keys often agree for a while.
                    k.extend((0..next(20)).map(|_| [0u8, 1, 0x41, 0xff][next(4) as usize]));
                    k
                })
                .collect();
            assert_sorts_like_bytes(&keys, &format!("round {round}"));
        }
        // Keys each seven bytes longer than the last: every group sorted splits one key off and
        // leaves the rest one chunk deeper, three hundred times.
        let staircase: Vec<Vec<u8>> = (0..300).map(|i| [vec![b'k'; 7 * i], b"z".to_vec()].concat()).collect();
        assert_sorts_like_bytes(&staircase, "staircase");
    }

    fn assert_sorts_like_bytes(keys: &[Vec<u8>], what: &str) {
        let mut data = Vec::new();
        let mut spans = Vec::new();
        for k in keys {
            spans.push((data.len() as u32, k.len() as u32));
            data.extend_from_slice(k);
        }
        sort_spans(&data, &mut spans);
        let ours: Vec<&[u8]> = spans.iter().map(|&(at, len)| &data[at as usize..(at + len) as usize]).collect();
        let mut expected: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        expected.sort();
        assert_eq!(ours, expected, "{what}");
    }

    #[test]
    fn the_difference_keeps_a_key_added_more_often_than_removed_once() {
        let dir = tempfile::tempdir().unwrap();
        let sorter = |name: &str, keys: &[&str]| {
            let mut s = KeySorter::new(dir.path(), name, 1 << 10);
            for k in keys {
                s.push(k.as_bytes()).unwrap();
            }
            s.finish().unwrap()
        };
        // b: added, removed, added again (present); c: added and removed (gone); d: added twice,
        // removed twice (gone); a, e: only added.
        let added = sorter("added", &["e", "b", "c", "d", "a", "b", "d"]);
        let removed = sorter("removed", &["d", "c", "b", "d"]);
        let left: Vec<String> = difference(added, removed).map(|k| String::from_utf8(k.unwrap()).unwrap()).collect();
        assert_eq!(left, ["a", "b", "e"]);
    }
}
