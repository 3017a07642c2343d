//! Reading the files an operator points the daemon at (config, client
//! secret, state) without trusting what is there: a regular file of sane
//! size, checked before it is opened.
//!
//! Without these checks `/dev/zero` as the secret file reads until memory
//! runs out, and a FIFO as the state path blocks start-up in `open(2)`
//! (where SIGTERM cannot reach the async runtime). Each check fails with one
//! `io::Error` whose message names the problem and what to do.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// Largest config file read: a config lists each connection in ~150 bytes,
/// so 16 MiB is over 100 000 connections, far beyond one daemon's reach.
pub const MAX_CONFIG_FILE: u64 = 16 << 20;
/// Largest client secret file read: a client secret is ~40 characters; 64 KiB
/// leaves room for comments-free PEM-sized values and still reads at once.
pub const MAX_SECRET_FILE: u64 = 64 << 10;
/// Largest state file read: ~300 bytes per connection, so 64 MiB is over
/// 200 000 connections.
pub const MAX_STATE_FILE: u64 = 64 << 20;

/// What kind of file `meta` describes, for the error message.
fn kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Checks that `meta` is a regular file of at most `max` bytes.
fn check(path: &Path, meta: &std::fs::Metadata, max: u64) -> io::Result<()> {
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is {}, not a regular file; point the setting at a regular file",
                path.display(),
                kind(meta)
            ),
        ));
    }
    if meta.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is {} bytes, more than the {max} bytes such a file can legitimately hold; check the path",
                path.display(),
                meta.len()
            ),
        ));
    }
    Ok(())
}

/// Reads `path` whole if it is a regular file of at most `max` bytes.
///
/// The type is checked before `open` (so a FIFO is never opened and cannot
/// block), again on the opened handle (the path may have been swapped), and
/// the read stops after `max` bytes whatever the file claims. A missing file
/// keeps its `NotFound` kind, so callers can still treat it as "absent".
pub fn read(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    check(path, &std::fs::metadata(path)?, max)?;
    let file = File::open(path)?;
    check(path, &file.metadata()?, max)?;
    let mut bytes = Vec::new();
    file.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} grew past {max} bytes while being read; check the path",
                path.display()
            ),
        ));
    }
    Ok(bytes)
}

/// [`read`], as UTF-8 text (`InvalidData` if it is not).
pub fn read_to_string(path: &Path, max: u64) -> io::Result<String> {
    String::from_utf8(read(path, max)?).map_err(|e| {
        let mut bytes = e.into_bytes();
        // Could be a secret file: do not leave its bytes behind.
        secrecy::zeroize::Zeroize::zeroize(&mut bytes);
        io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text")
    })
}

/// Whether other users may read the file at `path` (any of the group or
/// world read bits): a secret file should be `0600` or `0400`.
pub fn readable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o044 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_zero_is_refused_without_reading() {
        let error = read(Path::new("/dev/zero"), MAX_SECRET_FILE).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        assert!(error.to_string().contains("character device"), "{error}");
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        // Opening a FIFO for reading would block this test forever.
        let error = read(&fifo, MAX_STATE_FILE).unwrap_err();
        assert!(error.to_string().contains("FIFO"), "{error}");
    }

    #[test]
    fn a_large_file_is_refused_and_a_missing_one_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; 2048]).unwrap();
        let error = read(&big, 1024).unwrap_err();
        assert!(error.to_string().contains("2048 bytes"), "{error}");
        assert_eq!(read(&big, 4096).unwrap().len(), 2048);
        let missing = read(&dir.path().join("nope"), 10).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }
}
