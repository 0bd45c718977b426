//! `/proc/self/mounts`, parsed once for the agent, its tests and xtask: bpffs, cgroup2 and
//! tracefs are not always where they usually are (cgroup2 is at /sys/fs/cgroup/unified on a
//! hybrid layout), and mount points may hold escaped spaces.

use std::{io, path::PathBuf, string::String, vec::Vec};

/// One line of `/proc/self/mounts`: where, and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub point: PathBuf,
    pub fstype: String,
}

/// The mounts of this process's mount namespace.
pub fn read() -> io::Result<Vec<Mount>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mounts")?))
}

/// Where the first mount of `fstype` is, if there is one.
pub fn find(fstype: &str) -> io::Result<Option<PathBuf>> {
    Ok(read()?
        .into_iter()
        .find(|m| m.fstype == fstype)
        .map(|m| m.point))
}

/// Whether a filesystem of `fstype` is mounted at `point`.
pub fn is_mounted(fstype: &str, point: &std::path::Path) -> io::Result<bool> {
    Ok(read()?
        .iter()
        .any(|m| m.fstype == fstype && m.point == point))
}

/// The lines of a mounts table (`source point fstype options ...`).
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let _source = fields.next()?;
            let point = unescape(fields.next()?);
            let fstype = fields.next()?.into();
            Some(Mount {
                point: point.into(),
                fstype,
            })
        })
        .collect()
}

/// The kernel writes space, tab, newline and backslash in mount points as octal escapes
/// (`\040`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(d.iter().fold(0u8, |v, c| v.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_points_and_types_with_escapes_undone() {
        let text = "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n\
                    bpf /mnt/a\\040b bpf rw 0 0\n\
                    x /mnt/a\\\\b ext4 rw 0 0\n";
        let m = parse(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].point, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(m[0].fstype, "cgroup2");
        assert_eq!(m[1].point, PathBuf::from("/mnt/a b"));
        // Not an escape: a backslash and what follows are kept.
        assert_eq!(m[2].point, PathBuf::from("/mnt/a\\\\b"));
    }
}
