//! Segment files and the small file abstraction the store does all its I/O through.
//!
//! Segments are named `{seq:010}.seg` (ack logs `{seq:010}.ack`) so a directory listing sorts in
//! append order. All writes are positional (`pwrite` at a tracked end), which makes rolling back a
//! failed write a plain `set_len` to the previous end. The [`StoreFile`]/[`StoreIo`] traits exist so
//! tests can inject ENOSPC, write errors and observable fsyncs without a special filesystem.

use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Default segment size: big enough that rolls are rare, small enough that a settled segment frees
/// disk soon and recovery reads it in one go.
pub const DEFAULT_SEGMENT_SIZE: u64 = 8 * 1024 * 1024;
/// File name suffix of segments.
pub const SEGMENT_EXT: &str = "seg";
/// File name suffix of ack logs.
pub const ACK_EXT: &str = "ack";

/// One open store file. Positional I/O only, so concurrent reads and the syncer's writes never
/// share a cursor.
pub trait StoreFile: Send + Sync + Debug {
    /// Writes all of `buf` at `offset` (page cache; durable only after [`StoreFile::sync_data`]).
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// `fdatasync`: data and the size needed to read it back are on stable storage.
    fn sync_data(&self) -> io::Result<()>;
    /// Truncates or extends the file (used to cut torn tails and roll back failed writes).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Current file size.
    fn file_len(&self) -> io::Result<u64>;
}

/// Opens store files and syncs directories; the seam where tests inject faults.
pub trait StoreIo: Send + Sync + Debug {
    /// Opens `path` for reading and writing, creating it (empty) if `create` is set.
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn StoreFile>>;
    /// fsyncs a directory, making file creations, renames and deletions in it durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Deletes a file (a settled segment or its ack log).
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    /// Renames `from` to `to` atomically, replacing `to` (durable once the directory is fsynced).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsIo;

#[derive(Debug)]
struct OsFile(File);

impl StoreFile for OsFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn file_len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
}

impl StoreIo for OsIo {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn StoreFile>> {
        let f = OpenOptions::new().read(true).write(true).create(create).truncate(false).open(path)?;
        Ok(Arc::new(OsFile(f)))
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

/// Path of segment `seq` in `dir`.
pub fn segment_path(dir: &Path, seq: u32) -> PathBuf {
    dir.join(format!("{seq:010}.{SEGMENT_EXT}"))
}

/// Path of the ack log of segment `seq` in `dir`.
pub fn ack_path(dir: &Path, seq: u32) -> PathBuf {
    dir.join(format!("{seq:010}.{ACK_EXT}"))
}

/// Parses a store file name into its sequence number and extension; `None` for foreign files.
pub fn parse_name(name: &str) -> Option<(u32, &str)> {
    let (stem, ext) = name.split_once('.')?;
    if stem.len() != 10 || !stem.bytes().all(|b| b.is_ascii_digit()) || (ext != SEGMENT_EXT && ext != ACK_EXT) {
        return None;
    }
    Some((stem.parse().ok()?, ext))
}

/// Reads a whole file (a segment or ack log) into memory.
pub fn read_all(file: &dyn StoreFile) -> io::Result<Vec<u8>> {
    let len = file.file_len()?;
    let len = usize::try_from(len).map_err(|_| io::Error::other("file too large"))?;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

/// A segment being written: bytes on file (`written`), bytes the syncer is writing now
/// (`inflight`, at `written`), and bytes still buffered (`buf`, after those).
#[derive(Debug)]
pub struct SegmentWriter {
    /// Sequence number.
    pub seq: u32,
    /// Path, for error reports.
    pub path: PathBuf,
    /// The open file.
    pub file: Arc<dyn StoreFile>,
    /// Bytes known to be in the file (page cache at least).
    pub written: u64,
    /// Bytes taken by the syncer and being written at `written`.
    pub inflight: Option<Arc<Vec<u8>>>,
    /// Bytes appended since, not yet handed to the syncer.
    pub buf: Vec<u8>,
}

impl SegmentWriter {
    /// A writer for a fresh (or truncated) file of `len` bytes.
    pub fn new(seq: u32, path: PathBuf, file: Arc<dyn StoreFile>, len: u64) -> Self {
        SegmentWriter { seq, path, file, written: len, inflight: None, buf: Vec::new() }
    }

    /// Logical end: where the next record will go.
    pub fn end(&self) -> u64 {
        self.written + self.inflight.as_ref().map_or(0, |b| b.len() as u64) + self.buf.len() as u64
    }

    /// Whether anything is waiting to be written.
    pub fn has_pending(&self) -> bool {
        !self.buf.is_empty() || self.inflight.is_some()
    }

    /// Copies `out.len()` bytes at `offset` from memory if they are not on file yet; `false` if the
    /// range is on file (or not entirely in memory) and must be read from the file.
    pub fn read_buffered(&self, offset: u64, out: &mut [u8]) -> bool {
        let infl = self.inflight.as_ref().map_or(0, |b| b.len() as u64);
        let end = offset + out.len() as u64;
        if offset >= self.written + infl {
            let s = (offset - self.written - infl) as usize;
            match self.buf.get(s..s + out.len()) {
                Some(src) => {
                    out.copy_from_slice(src);
                    true
                }
                None => false,
            }
        } else if offset >= self.written && end <= self.written + infl {
            let s = (offset - self.written) as usize;
            out.copy_from_slice(&self.inflight.as_ref().expect("inflight")[s..s + out.len()]);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_foreign_files_are_ignored() {
        let p = segment_path(Path::new("/q"), 42);
        assert_eq!(p, Path::new("/q/0000000042.seg"));
        assert_eq!(parse_name("0000000042.seg"), Some((42, "seg")));
        assert_eq!(parse_name("0000000042.ack"), Some((42, "ack")));
        for bad in ["42.seg", "000000004x.seg", "0000000042.tmp", "readme", "0000000042"] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn buffered_reads_cover_inflight_and_buffer() {
        let dir = crate::store::queue_store::test_dir("segment-buffered");
        let file = OsIo.open(&dir.join("x"), true).unwrap();
        file.write_all_at(b"0123", 0).unwrap();
        let mut w = SegmentWriter::new(1, dir.join("x"), file, 4);
        w.inflight = Some(Arc::new(b"4567".to_vec()));
        w.buf = b"89ab".to_vec();
        assert_eq!(w.end(), 12);
        let mut out = [0u8; 2];
        assert!(w.read_buffered(9, &mut out));
        assert_eq!(&out, b"9a");
        assert!(w.read_buffered(5, &mut out));
        assert_eq!(&out, b"56");
        assert!(!w.read_buffered(1, &mut out));
        assert!(!w.read_buffered(7, &mut out), "straddles inflight and buf");
    }
}
