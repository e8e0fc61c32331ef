//! meterd's durable log: the write-ahead record of every accepted batch.
//!
//! The log is a directory of segment files named by the position (LSN, a byte offset over the
//! whole log) of their first byte. A record is framed as `[len: u32 LE][crc32: u32 LE][payload]`.
//! Only the newest segment can end in a torn record (a crash mid-write): opening the log scans
//! that segment and truncates it at the first record that is incomplete or fails its CRC. Older
//! segments were fsynced before the log rolled past them, so damage there is reported as
//! corruption instead of being cut away silently.
//!
//! One [`LogWriter`] appends; any number of [`LogReader`]s read from a position of their own.
//! Every consumer of the log (the dedup index, the embedded store, later PostgreSQL and
//! ClickHouse) registers a [`Consumer`] and advances its checkpoint once the data is durable on
//! its side; [`LogShared::trim`] deletes only whole segments that every consumer has passed.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::error::{Error, Result};

/// A position in the log: the byte offset of a record's start over all segments.
pub type Lsn = u64;

const HEADER_LEN: u64 = 8;
/// Records larger than this are refused on append and treated as corruption on read.
pub const MAX_RECORD_LEN: u32 = 256 * 1024 * 1024;
const SEGMENT_SUFFIX: &str = ".log";

fn segment_path(dir: &Path, base: Lsn) -> PathBuf {
    dir.join(format!("{base:020}{SEGMENT_SUFFIX}"))
}

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::LogIo {
        path: path.to_owned(),
        source,
    }
}

/// Fsyncs a directory so that file creations, renames and deletions in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, e))
}

/// State shared between the writer, the readers and the trimmer.
#[derive(Debug)]
pub struct LogShared {
    dir: PathBuf,
    /// Segment base -> segment length in bytes (the last one grows).
    segments: Mutex<BTreeMap<Lsn, u64>>,
    /// Everything before this position is fsynced.
    durable_end: AtomicU64,
    /// The same position, for readers that wait for it to move.
    durable_moved: watch::Sender<Lsn>,
    consumers: Mutex<Vec<Arc<ConsumerState>>>,
}

#[derive(Debug)]
struct ConsumerState {
    name: String,
    checkpoint: AtomicU64,
}

/// A registered reader of the log; the log keeps everything from its checkpoint on.
#[derive(Debug, Clone)]
pub struct Consumer {
    state: Arc<ConsumerState>,
}

impl Consumer {
    /// Declares everything before `lsn` durable on this consumer's side.
    pub fn advance(&self, lsn: Lsn) {
        self.state.checkpoint.fetch_max(lsn, Ordering::AcqRel);
    }

    /// The consumer's checkpoint.
    pub fn checkpoint(&self) -> Lsn {
        self.state.checkpoint.load(Ordering::Acquire)
    }

    /// The consumer's name.
    pub fn name(&self) -> &str {
        &self.state.name
    }
}

impl LogShared {
    /// The position after the last fsynced record.
    pub fn durable_end(&self) -> Lsn {
        self.durable_end.load(Ordering::Acquire)
    }

    /// A receiver that sees the durable end move: readers that caught up wait on it instead
    /// of polling.
    pub fn watch_durable_end(&self) -> watch::Receiver<Lsn> {
        self.durable_moved.subscribe()
    }

    /// The oldest position still on disk.
    pub fn start(&self) -> Lsn {
        self.lock_segments()
            .keys()
            .next()
            .copied()
            .unwrap_or_else(|| self.durable_end())
    }

    /// Bytes held on disk (from the oldest kept segment to the end).
    pub fn retained_bytes(&self) -> u64 {
        self.lock_segments().values().sum()
    }

    /// Registers a consumer whose checkpoint starts at `checkpoint`.
    pub fn register(&self, name: &str, checkpoint: Lsn) -> Consumer {
        let state = Arc::new(ConsumerState {
            name: name.to_owned(),
            checkpoint: AtomicU64::new(checkpoint),
        });
        self.lock_consumers().push(Arc::clone(&state));
        Consumer { state }
    }

    /// Each consumer's name and checkpoint.
    pub fn consumers(&self) -> Vec<(String, Lsn)> {
        self.lock_consumers()
            .iter()
            .map(|c| (c.name.clone(), c.checkpoint.load(Ordering::Acquire)))
            .collect()
    }

    /// Deletes every segment that lies wholly before the slowest consumer's checkpoint (and never
    /// the segment being written). Returns the bytes freed.
    pub fn trim(&self) -> Result<u64> {
        let Some(low) = self
            .lock_consumers()
            .iter()
            .map(|c| c.checkpoint.load(Ordering::Acquire))
            .min()
        else {
            return Ok(0);
        };
        let doomed: Vec<(Lsn, u64)> = {
            let segments = self.lock_segments();
            let bases: Vec<Lsn> = segments.keys().copied().collect();
            bases
                .windows(2)
                .filter(|w| w[1] <= low)
                .map(|w| (w[0], segments.get(&w[0]).copied().unwrap_or(0)))
                .collect()
        };
        let mut freed = 0;
        for (base, len) in &doomed {
            let path = segment_path(&self.dir, *base);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path, e)),
            }
            self.lock_segments().remove(base);
            freed += len;
        }
        if !doomed.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(freed)
    }

    /// Opens a reader positioned at `from`, which must be a record boundary at or after
    /// [`start`](Self::start).
    pub fn reader(self: &Arc<Self>, from: Lsn) -> Result<LogReader> {
        let start = self.start();
        if from < start {
            return Err(Error::LogTrimmed {
                requested: from,
                start,
            });
        }
        Ok(LogReader {
            shared: Arc::clone(self),
            pos: from,
            file: None,
        })
    }

    fn lock_segments(&self) -> std::sync::MutexGuard<'_, BTreeMap<Lsn, u64>> {
        // A panic while holding this lock cannot leave the map half-updated (single inserts and
        // removes), so a poisoned lock is still consistent.
        self.segments
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_consumers(&self) -> std::sync::MutexGuard<'_, Vec<Arc<ConsumerState>>> {
        self.consumers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Options of the log.
#[derive(Debug, Clone, Copy)]
pub struct LogOptions {
    /// A segment is closed and a new one started once it reaches this size.
    pub segment_bytes: u64,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 64 * 1024 * 1024,
        }
    }
}

/// The single appender of the log.
#[derive(Debug)]
pub struct LogWriter {
    shared: Arc<LogShared>,
    options: LogOptions,
    file: BufWriter<File>,
    base: Lsn,
    /// Bytes in the current segment, written or buffered.
    len: u64,
}

/// What opening the log found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    /// Bytes of torn or corrupt tail cut from the newest segment.
    pub truncated_bytes: u64,
}

impl LogWriter {
    /// Opens (or creates) the log in `dir`, cutting a torn tail from the newest segment.
    pub fn open(dir: &Path, options: LogOptions) -> Result<(Self, Arc<LogShared>, Recovery)> {
        fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let mut segments = BTreeMap::new();
        for entry in fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
            let entry = entry.map_err(|e| io_err(dir, e))?;
            let name = entry.file_name();
            let Some(base) = name
                .to_str()
                .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
                .and_then(|n| n.parse().ok())
            else {
                continue;
            };
            let len = entry
                .metadata()
                .map_err(|e| io_err(&entry.path(), e))?
                .len();
            segments.insert(base, len);
        }
        let mut recovery = Recovery { truncated_bytes: 0 };
        let base = match segments.last_key_value() {
            Some((&base, &len)) => {
                let path = segment_path(dir, base);
                let valid = valid_prefix_len(&path)?;
                if valid < len {
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(|e| io_err(&path, e))?;
                    f.set_len(valid).map_err(|e| io_err(&path, e))?;
                    f.sync_all().map_err(|e| io_err(&path, e))?;
                    recovery.truncated_bytes = len - valid;
                    segments.insert(base, valid);
                }
                base
            }
            None => {
                segments.insert(0, 0);
                0
            }
        };
        let len = segments.get(&base).copied().unwrap_or(0);
        let path = segment_path(dir, base);
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        file.seek(SeekFrom::End(0)).map_err(|e| io_err(&path, e))?;
        file.sync_all().map_err(|e| io_err(&path, e))?;
        sync_dir(dir)?;
        let shared = Arc::new(LogShared {
            dir: dir.to_owned(),
            segments: Mutex::new(segments),
            durable_end: AtomicU64::new(base + len),
            durable_moved: watch::Sender::new(base + len),
            consumers: Mutex::new(Vec::new()),
        });
        let writer = Self {
            shared: Arc::clone(&shared),
            options,
            file: BufWriter::with_capacity(1 << 20, file),
            base,
            len,
        };
        Ok((writer, shared, recovery))
    }

    /// The state shared with readers.
    pub fn shared(&self) -> &Arc<LogShared> {
        &self.shared
    }

    /// The position the next record will get.
    pub fn end(&self) -> Lsn {
        self.base + self.len
    }

    /// Buffers one record; it is durable only after [`sync`](Self::sync). Returns its position.
    pub fn append(&mut self, payload: &[u8]) -> Result<Lsn> {
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|l| *l <= MAX_RECORD_LEN)
            .ok_or(Error::RecordTooLarge { len: payload.len() })?;
        if self.len > 0 && self.len + HEADER_LEN + u64::from(len) > self.options.segment_bytes {
            self.roll()?;
        }
        let lsn = self.end();
        let crc = crc32fast::hash(payload);
        let path = || segment_path(&self.shared.dir, self.base);
        let mut header = [0u8; HEADER_LEN as usize];
        header[..4].copy_from_slice(&len.to_le_bytes());
        header[4..].copy_from_slice(&crc.to_le_bytes());
        self.file
            .write_all(&header)
            .map_err(|e| io_err(&path(), e))?;
        self.file
            .write_all(payload)
            .map_err(|e| io_err(&path(), e))?;
        self.len += HEADER_LEN + u64::from(len);
        Ok(lsn)
    }

    /// Writes out and fsyncs everything appended; afterwards it survives a crash.
    pub fn sync(&mut self) -> Result<Lsn> {
        let path = segment_path(&self.shared.dir, self.base);
        self.file.flush().map_err(|e| io_err(&path, e))?;
        self.file
            .get_ref()
            .sync_data()
            .map_err(|e| io_err(&path, e))?;
        let end = self.end();
        self.shared.lock_segments().insert(self.base, self.len);
        self.shared.durable_end.store(end, Ordering::Release);
        self.shared.durable_moved.send_if_modified(|seen| {
            let moved = *seen != end;
            *seen = end;
            moved
        });
        Ok(end)
    }

    fn roll(&mut self) -> Result<()> {
        self.sync()?;
        let base = self.end();
        let path = segment_path(&self.shared.dir, base);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        sync_dir(&self.shared.dir)?;
        self.file = BufWriter::with_capacity(1 << 20, file);
        self.base = base;
        self.len = 0;
        self.shared.lock_segments().insert(base, 0);
        Ok(())
    }
}

/// Length of the longest prefix of a segment made of whole, CRC-valid records.
fn valid_prefix_len(path: &Path) -> Result<u64> {
    let file = File::open(path).map_err(|e| io_err(path, e))?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut pos = 0u64;
    let mut payload = Vec::new();
    loop {
        match read_record(&mut r, &mut payload) {
            Ok(Some(n)) => pos += n,
            Ok(None) | Err(RecordError::Torn | RecordError::Crc) => return Ok(pos),
            Err(RecordError::Io(e)) => return Err(io_err(path, e)),
        }
    }
}

enum RecordError {
    /// The record is cut short (or claims an impossible length).
    Torn,
    /// The payload does not match its checksum.
    Crc,
    Io(std::io::Error),
}

/// Reads one record into `payload`; `Ok(None)` at a clean end. Returns the framed length.
fn read_record(
    r: &mut impl Read,
    payload: &mut Vec<u8>,
) -> std::result::Result<Option<u64>, RecordError> {
    let mut header = [0u8; HEADER_LEN as usize];
    let mut filled = 0;
    while filled < header.len() {
        match r.read(&mut header[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(RecordError::Torn),
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(RecordError::Io(e)),
        }
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_RECORD_LEN {
        return Err(RecordError::Torn);
    }
    payload.clear();
    payload.resize(len as usize, 0);
    match r.read_exact(payload) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Err(RecordError::Torn),
        Err(e) => return Err(RecordError::Io(e)),
    }
    if crc32fast::hash(payload) != crc {
        return Err(RecordError::Crc);
    }
    Ok(Some(HEADER_LEN + u64::from(len)))
}

/// Reads records in order from a position, up to the durable end.
#[derive(Debug)]
pub struct LogReader {
    shared: Arc<LogShared>,
    pos: Lsn,
    file: Option<(Lsn, BufReader<File>)>,
}

impl LogReader {
    /// The position of the next record.
    pub fn position(&self) -> Lsn {
        self.pos
    }

    /// The next durable record as `(lsn, end, payload)`, or `None` when the reader has caught
    /// up with the durable end.
    pub fn next_record(&mut self, payload: &mut Vec<u8>) -> Result<Option<(Lsn, Lsn)>> {
        let durable_end = self.shared.durable_end();
        loop {
            if self.pos >= durable_end {
                return Ok(None);
            }
            let (base, seg_len) = {
                let segments = self.shared.lock_segments();
                match segments.range(..=self.pos).next_back() {
                    Some((&b, &l)) => (b, l),
                    None => {
                        return Err(Error::LogTrimmed {
                            requested: self.pos,
                            start: self.shared.start(),
                        });
                    }
                }
            };
            if self.pos >= base + seg_len {
                // Past the end of this segment: the next one starts exactly here.
                let next = self
                    .shared
                    .lock_segments()
                    .range(self.pos..)
                    .next()
                    .map(|(b, _)| *b);
                match next {
                    Some(b) if b == self.pos => {
                        self.file = None;
                        continue;
                    }
                    _ => return Ok(None),
                }
            }
            let path = segment_path(&self.shared.dir, base);
            let reopen = !matches!(&self.file, Some((b, _)) if *b == base);
            if reopen {
                let mut f = File::open(&path).map_err(|e| io_err(&path, e))?;
                f.seek(SeekFrom::Start(self.pos - base))
                    .map_err(|e| io_err(&path, e))?;
                self.file = Some((base, BufReader::with_capacity(1 << 20, f)));
            }
            let Some((_, r)) = self.file.as_mut() else {
                continue;
            };
            return match read_record(r, payload) {
                Ok(Some(n)) => {
                    let lsn = self.pos;
                    self.pos += n;
                    Ok(Some((lsn, self.pos)))
                }
                Ok(None) => {
                    self.file = None;
                    Err(Error::LogCorrupt {
                        lsn: self.pos,
                        reason: "segment ends before its recorded length",
                    })
                }
                Err(RecordError::Torn) => Err(Error::LogCorrupt {
                    lsn: self.pos,
                    reason: "record cut short",
                }),
                Err(RecordError::Crc) => Err(Error::LogCorrupt {
                    lsn: self.pos,
                    reason: "checksum mismatch",
                }),
                Err(RecordError::Io(e)) => Err(io_err(&path, e)),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(shared: &Arc<LogShared>, from: Lsn) -> Vec<Vec<u8>> {
        let mut r = shared.reader(from).expect("reader");
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while r.next_record(&mut buf).expect("read").is_some() {
            out.push(buf.clone());
        }
        out
    }

    #[test]
    fn appends_are_read_back_after_sync_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut w, shared, _) = LogWriter::open(dir.path(), LogOptions::default()).expect("open");
        w.append(b"one").expect("append");
        assert!(
            records(&shared, 0).is_empty(),
            "unsynced records are not visible"
        );
        w.append(b"two").expect("append");
        w.sync().expect("sync");
        assert_eq!(records(&shared, 0), vec![b"one".to_vec(), b"two".to_vec()]);
        assert_eq!(records(&shared, HEADER_LEN + 3), vec![b"two".to_vec()]);
    }

    #[test]
    fn rolls_segments_and_reads_across_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut w, shared, _) =
            LogWriter::open(dir.path(), LogOptions { segment_bytes: 64 }).expect("open");
        let payloads: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 20]).collect();
        for p in &payloads {
            w.append(p).expect("append");
        }
        w.sync().expect("sync");
        assert!(shared.lock_segments().len() > 5);
        assert_eq!(records(&shared, 0), payloads);
        drop(w);
        let (_, shared, rec) =
            LogWriter::open(dir.path(), LogOptions { segment_bytes: 64 }).expect("reopen");
        assert_eq!(rec.truncated_bytes, 0);
        assert_eq!(records(&shared, 0), payloads);
    }

    #[test]
    fn torn_tail_is_cut_and_appends_continue() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut w, _, _) = LogWriter::open(dir.path(), LogOptions::default()).expect("open");
        w.append(b"kept").expect("append");
        w.sync().expect("sync");
        drop(w);
        // A crash mid-append leaves a header and half a payload.
        let path = segment_path(dir.path(), 0);
        let mut f = OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open segment");
        f.write_all(&100u32.to_le_bytes()).expect("write");
        f.write_all(&[1, 2, 3, 4, 5, 6]).expect("write");
        drop(f);
        let (mut w, shared, rec) =
            LogWriter::open(dir.path(), LogOptions::default()).expect("reopen");
        assert_eq!(rec.truncated_bytes, 10);
        w.append(b"after").expect("append");
        w.sync().expect("sync");
        assert_eq!(
            records(&shared, 0),
            vec![b"kept".to_vec(), b"after".to_vec()]
        );
    }

    #[test]
    fn corrupt_tail_record_is_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut w, _, _) = LogWriter::open(dir.path(), LogOptions::default()).expect("open");
        w.append(b"good").expect("append");
        w.append(b"flipped").expect("append");
        w.sync().expect("sync");
        drop(w);
        let path = segment_path(dir.path(), 0);
        let mut bytes = fs::read(&path).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&path, bytes).expect("write");
        let (_, shared, rec) = LogWriter::open(dir.path(), LogOptions::default()).expect("reopen");
        assert_eq!(rec.truncated_bytes, HEADER_LEN + 7);
        assert_eq!(records(&shared, 0), vec![b"good".to_vec()]);
    }

    #[test]
    fn corruption_in_a_sealed_segment_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut w, _, _) =
            LogWriter::open(dir.path(), LogOptions { segment_bytes: 32 }).expect("open");
        for _ in 0..4 {
            w.append(&[7u8; 16]).expect("append");
        }
        w.sync().expect("sync");
        drop(w);
        let path = segment_path(dir.path(), 0);
        let mut bytes = fs::read(&path).expect("read");
        bytes[HEADER_LEN as usize] ^= 1;
        fs::write(&path, bytes).expect("write");
        let (_, shared, _) =
            LogWriter::open(dir.path(), LogOptions { segment_bytes: 32 }).expect("reopen");
        let mut r = shared.reader(0).expect("reader");
        let err = r.next_record(&mut Vec::new()).expect_err("corrupt");
        assert!(matches!(err, Error::LogCorrupt { lsn: 0, .. }), "{err:?}");
    }

    #[test]
    fn trim_keeps_what_the_slowest_consumer_needs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut w, shared, _) =
            LogWriter::open(dir.path(), LogOptions { segment_bytes: 32 }).expect("open");
        let mut ends = Vec::new();
        for i in 0..10u8 {
            w.append(&[i; 16]).expect("append");
            ends.push(w.sync().expect("sync"));
        }
        let fast = shared.register("fast", 0);
        let slow = shared.register("slow", 0);
        fast.advance(ends[9]);
        slow.advance(ends[3]);
        shared.trim().expect("trim");
        assert_eq!(shared.start(), ends[3]);
        assert_eq!(records(&shared, ends[3]).len(), 6);
        assert!(matches!(shared.reader(0), Err(Error::LogTrimmed { .. })));
        slow.advance(ends[9]);
        shared.trim().expect("trim");
        // The segment being written is never deleted.
        assert_eq!(shared.start(), ends[9] - (HEADER_LEN + 16));
        assert_eq!(shared.consumers().len(), 2);
    }

    #[test]
    fn property_random_tails_recover_to_a_prefix() {
        use proptest::prelude::*;
        proptest!(ProptestConfig::with_cases(48), |(
            sizes in proptest::collection::vec(0usize..300, 1..20),
            cut in 0usize..4000,
        )| {
            let dir = tempfile::tempdir().expect("tempdir");
            let (mut w, _, _) = LogWriter::open(dir.path(), LogOptions::default()).expect("open");
            let payloads: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, s)| vec![i as u8; *s]).collect();
            for p in &payloads {
                w.append(p).expect("append");
            }
            w.sync().expect("sync");
            drop(w);
            let path = segment_path(dir.path(), 0);
            let full = fs::metadata(&path).expect("meta").len() as usize;
            let keep = cut.min(full);
            let f = OpenOptions::new().write(true).open(&path).expect("open");
            f.set_len(keep as u64).expect("truncate");
            drop(f);
            let (_, shared, _) = LogWriter::open(dir.path(), LogOptions::default()).expect("reopen");
            let got = records(&shared, 0);
            prop_assert!(got.len() <= payloads.len());
            prop_assert_eq!(&payloads[..got.len()], &got[..]);
            // Every whole record that fit in the kept bytes survived.
            let whole = payloads.iter().scan(0usize, |acc, p| { *acc += 8 + p.len(); Some(*acc) })
                .take_while(|end| *end <= keep).count();
            prop_assert_eq!(got.len(), whole);
        });
    }
}
