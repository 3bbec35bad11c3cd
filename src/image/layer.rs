//! Applying layers to the staging tree: decompression, digest checks, OCI
//! whiteouts, and the rule that nothing lands outside the root.
//!
//! Every entry's parent directory is resolved component by component from
//! the root: missing directories are created, real directories entered,
//! and a symlink is followed only when its target (canonicalized) is still
//! inside the root, so an absolute symlink or one that climbs out, followed
//! by an entry through it, is an error. `..` anywhere in an entry path is an
//! error. The entry itself is then written by the `tar` crate, which replaces
//! (never follows) an existing final component.

use std::collections::HashSet;
use std::ffi::CString;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use super::source::{Compression, Digesting, LayerRef};
use super::ImageError;

/// A progress line per this many uncompressed bytes of one layer.
const PROGRESS_EVERY: u64 = 256 << 20;

/// Applies layers, in order, to one staging root.
pub struct Applier {
    root: PathBuf,
    /// `root`, canonicalized: what "inside" is checked against.
    canon_root: PathBuf,
    /// Owners and device nodes need root; without it they are skipped.
    privileged: bool,
    warned_unprivileged: bool,
}

fn io_err(layer: usize, what: String) -> impl FnOnce(std::io::Error) -> ImageError {
    move |source| ImageError::Layer {
        layer,
        what,
        source,
    }
}

/// Remove whatever is at `path` (never following a symlink there).
fn remove_any(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

impl Applier {
    /// An applier for the (existing, empty) directory `root`.
    pub fn new(root: &Path) -> Result<Self, ImageError> {
        let canon_root = root
            .canonicalize()
            .map_err(ImageError::io("resolve", root))?;
        // SAFETY: geteuid(2) has no preconditions.
        let privileged = unsafe { libc::geteuid() } == 0;
        if !privileged {
            log::warn!("not root: file owners in the image become yours, device nodes are skipped");
        }
        Ok(Self {
            root: root.to_path_buf(),
            canon_root,
            privileged,
            warned_unprivileged: false,
        })
    }

    /// The directory `rel` (relative to the root) as a real, canonical path
    /// inside the root, creating missing components (mode 0755).
    pub fn dir_inside(&self, layer: usize, entry: &str, rel: &Path) -> Result<PathBuf, ImageError> {
        let escapes = |why| ImageError::Escapes {
            layer,
            entry: entry.to_string(),
            why,
        };
        let mut cur = self.canon_root.clone();
        for c in rel.components() {
            let Component::Normal(name) = c else {
                return Err(escapes("'..' or an absolute path"));
            };
            let next = cur.join(name);
            match std::fs::symlink_metadata(&next) {
                Ok(m) if m.is_dir() => cur = next,
                Ok(m) if m.file_type().is_symlink() => {
                    let target = next
                        .canonicalize()
                        .map_err(|_| escapes("through a dangling symlink"))?;
                    if !target.starts_with(&self.canon_root) {
                        return Err(escapes("through a symlink that points outside"));
                    }
                    if !target.is_dir() {
                        return Err(escapes("through a symlink to a non-directory"));
                    }
                    cur = target;
                }
                Ok(_) => {
                    return Err(
                        io_err(layer, format!("{entry}: parent is not a directory"))(
                            std::io::Error::from(std::io::ErrorKind::NotADirectory),
                        ),
                    )
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::create_dir(&next)
                        .map_err(io_err(layer, format!("create {}", next.display())))?;
                    cur = next;
                }
                Err(e) => return Err(io_err(layer, format!("stat {}", next.display()))(e)),
            }
        }
        Ok(cur)
    }

    /// Apply one layer from `blob`.
    pub fn apply(
        &mut self,
        layer: usize,
        blob: Box<dyn Read + Send>,
        l: &LayerRef,
        progress: &dyn Fn(&str),
    ) -> Result<(), ImageError> {
        let (raw, raw_digest) = Digesting::new(blob);
        let mut raw = BufReader::with_capacity(1 << 20, raw);
        let compression = match l.compression {
            Compression::Sniff => {
                let head = raw
                    .fill_buf()
                    .map_err(io_err(layer, format!("read {}", l.name)))?;
                if head.starts_with(&[0x1f, 0x8b]) {
                    Compression::Gzip
                } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
                    Compression::Zstd
                } else {
                    Compression::None
                }
            }
            c => c,
        };
        let decoded: Box<dyn Read> = match compression {
            Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(raw)),
            Compression::Zstd => Box::new(
                zstd::stream::read::Decoder::with_buffer(raw)
                    .map_err(io_err(layer, "start zstd".into()))?,
            ),
            Compression::None | Compression::Sniff => Box::new(raw),
        };
        let (tar_stream, diff_digest) = Digesting::new(decoded);
        let mut ar = tar::Archive::new(tar_stream);
        ar.set_preserve_permissions(true);
        ar.set_preserve_ownerships(self.privileged);
        ar.set_preserve_mtime(true);
        ar.set_unpack_xattrs(true);
        ar.set_overwrite(true);
        ar.set_mask(0);
        let mut created = HashSet::new();
        let mut next_report = PROGRESS_EVERY;
        let entries = ar
            .entries()
            .map_err(io_err(layer, format!("read {}", l.name)))?;
        for e in entries {
            let mut e = e.map_err(io_err(layer, format!("read {}", l.name)))?;
            self.entry(layer, &mut e, &mut created)?;
            let (_, n) = diff_digest.finish();
            if n >= next_report {
                progress(&format!("  layer {layer}: {} MiB unpacked", n >> 20));
                next_report = n + PROGRESS_EVERY;
            }
        }
        // Whatever follows the tar's end-of-archive blocks counts for the digests.
        let mut rest = ar.into_inner();
        std::io::copy(&mut rest, &mut std::io::sink())
            .map_err(io_err(layer, format!("read {}", l.name)))?;
        drop(rest);

        let (actual, _) = diff_digest.finish();
        if let Some(expected) = &l.diff_id {
            if &actual != expected {
                return Err(ImageError::Digest {
                    what: format!("layer {layer} ({}) uncompressed", l.name),
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        let (actual, size) = raw_digest.finish();
        if let Some(expected) = &l.blob_digest {
            if &actual != expected {
                return Err(ImageError::Digest {
                    what: format!("layer {layer} blob"),
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        if let Some(expected) = l.size {
            if size != expected {
                return Err(ImageError::Malformed(format!(
                    "layer {layer}: blob is {size} bytes, descriptor says {expected}"
                )));
            }
        }
        Ok(())
    }

    fn entry<R: Read>(
        &mut self,
        layer: usize,
        e: &mut tar::Entry<'_, R>,
        created: &mut HashSet<PathBuf>,
    ) -> Result<(), ImageError> {
        let kind = e.header().entry_type();
        if kind.is_pax_global_extensions() {
            return Ok(());
        }
        let raw = e
            .path()
            .map_err(io_err(layer, "entry with an invalid path".into()))?
            .into_owned();
        let shown = raw.display().to_string();
        let escapes = |why| ImageError::Escapes {
            layer,
            entry: shown.clone(),
            why,
        };
        let mut rel = PathBuf::new();
        for c in raw.components() {
            match c {
                Component::Normal(s) => rel.push(s),
                Component::CurDir | Component::RootDir => {}
                Component::ParentDir | Component::Prefix(_) => {
                    return Err(escapes("'..' in the path"))
                }
            }
        }
        let (Some(name), Some(parent_rel)) = (rel.file_name(), rel.parent()) else {
            return Ok(()); // the root itself ("./")
        };
        let name = name.to_os_string();
        let parent = self.dir_inside(layer, &shown, parent_rel)?;
        let name_bytes = name.as_bytes();

        // OCI whiteouts hide what lower layers put there; this layer's own
        // entries stay (the marker may come after them in the tar).
        if name_bytes == b".wh..wh..opq" {
            self.opaque(&parent, parent_rel, created)
                .map_err(io_err(layer, format!("opaque whiteout {shown}")))?;
            return Ok(());
        }
        if let Some(victim) = name_bytes.strip_prefix(b".wh.") {
            if victim.starts_with(b".wh.") || victim.is_empty() {
                return Ok(()); // other AUFS metadata
            }
            let victim = std::ffi::OsStr::from_bytes(victim);
            if !created.contains(&parent_rel.join(victim)) {
                remove_any(&parent.join(victim))
                    .map_err(io_err(layer, format!("whiteout {shown}")))?;
            }
            return Ok(());
        }

        if kind.is_hard_link() {
            let target = e
                .link_name()
                .map_err(io_err(layer, format!("{shown}: bad link name")))?
                .unwrap_or_default();
            if target
                .components()
                .any(|c| matches!(c, Component::ParentDir | Component::Prefix(_)))
            {
                return Err(escapes("hard link target outside the root"));
            }
        }

        // A directory entry merges into an existing directory; anything else
        // replaces what is there (hard links and device nodes would fail on
        // an existing name, a directory would not be replaced at all).
        let dst = parent.join(&name);
        if let Ok(m) = std::fs::symlink_metadata(&dst) {
            if !(m.is_dir() && kind.is_dir()) {
                remove_any(&dst).map_err(io_err(layer, format!("replace {shown}")))?;
            }
        }
        created.insert(rel.clone());

        use tar::EntryType as T;
        match kind {
            T::Char | T::Block | T::Fifo => self.mknod(layer, e, &dst, &shown),
            _ => match e.unpack_in(&self.root) {
                Ok(true) => Ok(()),
                Ok(false) => Err(escapes("refused by the unpacker")),
                Err(err) => Err(io_err(layer, format!("unpack {shown}"))(err)),
            },
        }
    }

    /// `.wh..wh..opq` in `dir`: remove everything there that this layer did
    /// not create, down the tree.
    fn opaque(&self, dir: &Path, rel: &Path, created: &HashSet<PathBuf>) -> std::io::Result<()> {
        for child in std::fs::read_dir(dir)? {
            let child = child?;
            let child_rel = rel.join(child.file_name());
            let path = child.path();
            if !created.contains(&child_rel) {
                remove_any(&path)?;
            } else if child.file_type()?.is_dir() {
                self.opaque(&path, &child_rel, created)?;
            }
        }
        Ok(())
    }

    fn mknod<R: Read>(
        &mut self,
        layer: usize,
        e: &tar::Entry<'_, R>,
        dst: &Path,
        shown: &str,
    ) -> Result<(), ImageError> {
        let h = e.header();
        let kind = h.entry_type();
        if !self.privileged && kind != tar::EntryType::Fifo {
            if !self.warned_unprivileged {
                log::warn!("device node {shown} skipped (not root)");
                self.warned_unprivileged = true;
            }
            return Ok(());
        }
        let fmt = match kind {
            tar::EntryType::Char => libc::S_IFCHR,
            tar::EntryType::Block => libc::S_IFBLK,
            _ => libc::S_IFIFO,
        };
        let bad = |what: &str| {
            io_err(layer, format!("{shown}: {what}"))(std::io::Error::from(
                std::io::ErrorKind::InvalidData,
            ))
        };
        let mode = h.mode().map_err(|_| bad("bad mode"))? & 0o7777;
        let major = h.device_major().ok().flatten().unwrap_or(0);
        let minor = h.device_minor().ok().flatten().unwrap_or(0);
        let c = CString::new(dst.as_os_str().as_bytes()).map_err(|_| bad("NUL in path"))?;
        // SAFETY: mknod(2) on a NUL-terminated path inside the staging root;
        // nothing exists there (checked by the caller or removed).
        let rc = unsafe { libc::mknod(c.as_ptr(), fmt | mode, libc::makedev(major, minor)) };
        if rc != 0 {
            return Err(io_err(layer, format!("mknod {shown}"))(
                std::io::Error::last_os_error(),
            ));
        }
        if self.privileged {
            let uid = h
                .uid()
                .ok()
                .and_then(|u| u32::try_from(u).ok())
                .unwrap_or(0);
            let gid = h
                .gid()
                .ok()
                .and_then(|g| u32::try_from(g).ok())
                .unwrap_or(0);
            // SAFETY: lchown(2) on the node we just created.
            unsafe { libc::lchown(c.as_ptr(), uid, gid) };
        }
        Ok(())
    }
}
