//! The staging tree as an ext4 image: `mkfs.ext4 -d`, which copies modes,
//! owners, symlinks, hard links, device nodes and xattrs as they are on disk.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use super::ImageError;

/// Bytes and inodes the tree needs (allocated blocks; hard links once).
fn usage(root: &Path) -> Result<(u64, u64), ImageError> {
    let mut bytes = 0u64;
    let mut inodes = 0u64;
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).map_err(ImageError::io("read", &dir))? {
            let e = e.map_err(ImageError::io("read", &dir))?;
            let m = e.metadata().map_err(ImageError::io("stat", e.path()))?;
            if m.nlink() > 1 && !m.is_dir() && !seen.insert(m.ino()) {
                continue;
            }
            inodes += 1;
            bytes += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok((bytes, inodes + 1))
}

/// Write `root` into a new ext4 file `image`; returns its size in MiB.
pub fn make(
    root: &Path,
    image: &Path,
    size_mib: Option<u64>,
    progress: &dyn Fn(&str),
) -> Result<u64, ImageError> {
    let (bytes, files) = usage(root)?;
    // Same shape as rootfs/build.sh: inodes for the files + 50% + 8192;
    // size = used + 25% + inode tables + 64 MiB of room for the guest.
    let inodes = files + files / 2 + 8192;
    let size = size_mib.unwrap_or_else(|| (bytes / 4 * 5 + inodes * 256).div_ceil(1 << 20) + 64);
    progress(&format!(
        "mkfs.ext4: {} MiB in {files} files -> {size} MiB image",
        bytes >> 20
    ));
    let out = Command::new("mkfs.ext4")
        .args([
            "-q", "-F", "-L", "rootfs", "-b", "4096", "-I", "256", "-m", "0",
        ])
        .args(["-N", &inodes.to_string()])
        // No metadata_csum (software crc32c is costly where the guest kernel
        // is interpreted); no lazy init work left for the guest.
        .args([
            "-O",
            "^metadata_csum",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
        ])
        .arg("-d")
        .arg(root)
        .arg(image)
        .arg(format!("{size}M"))
        .output()
        .map_err(ImageError::io("run mkfs.ext4 (e2fsprogs) for", image))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let hint = if size_mib.is_some() {
            " (is --size large enough?)"
        } else {
            ""
        };
        return Err(ImageError::Mkfs(format!("{}{hint}", err.trim())));
    }
    Ok(size)
}
