//! `microvm image build`: turn a container image (OCI layout, OCI archive or
//! `docker save` tarball) into an ext4 root filesystem that boots with
//! `microvm --rootfs`.
//!
//! The steps, each in its own file:
//! 1. [`source`]: find the manifest, the config and the layers, reading blobs
//!    from a directory or straight out of the outer tar; every blob's sha256
//!    is checked against its digest.
//! 2. [`layer`]: apply the layers in order to a staging tree with OCI
//!    whiteouts, refusing any entry that would land outside it.
//! 3. [`inject`]: add `/sbin/microvm-init` (and `/sbin/init` pointing at
//!    it) and `/etc/microvm/init.conf` with the image's Entrypoint, Cmd, Env,
//!    WorkingDir, User and exposed TCP ports.
//! 4. [`ext4`]: `mkfs.ext4 -d` into a temporary file next to the output,
//!    renamed over it when complete.
//!
//! Archives are hostile input: nothing here panics on them, nothing is
//! written outside the staging directory, and a failed build leaves no output.

pub mod command;
mod ext4;
mod inject;
mod layer;
mod source;

use std::path::{Path, PathBuf};
use std::time::Instant;

pub use source::Compression;

/// Everything that can go wrong building an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A file or directory could not be read or written.
    #[error("{what} '{}'", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// SOURCE is neither an OCI layout, an OCI archive nor a docker archive.
    #[error("'{0}' is not an OCI image layout, OCI archive or docker-save tarball")]
    UnknownFormat(PathBuf),
    /// A JSON document of the image does not parse.
    #[error("{0}: invalid JSON")]
    Json(String, #[source] serde_json::Error),
    /// A JSON document that parses but is not what the format requires.
    #[error("{0}")]
    Malformed(String),
    /// A blob the image refers to is not in the source.
    #[error("missing blob {0}")]
    MissingBlob(String),
    /// A blob's content does not match its digest (or its size).
    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    Digest {
        /// Which blob.
        what: String,
        /// The digest the image claims.
        expected: String,
        /// What its content hashes to.
        actual: String,
    },
    /// A digest that is not `sha256:<64 hex digits>`.
    #[error("unsupported or malformed digest '{0}'")]
    BadDigest(String),
    /// A media type microvm does not know how to unpack.
    #[error("unsupported media type '{0}'")]
    MediaType(String),
    /// An image built for another platform.
    #[error("image is for {0}; microvm runs linux/amd64 guests")]
    Platform(String),
    /// A layer entry that would be written outside the root.
    #[error("layer {layer}: entry '{entry}' escapes the image root ({why})")]
    Escapes {
        /// 1-based layer number.
        layer: usize,
        /// The entry's path in the layer.
        entry: String,
        /// How.
        why: &'static str,
    },
    /// A layer that cannot be read or applied.
    #[error("layer {layer}: {what}")]
    Layer {
        /// 1-based layer number.
        layer: usize,
        /// What failed.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The init binary is not usable in an image.
    #[error("init binary '{}': {why}", path.display())]
    Init {
        /// The file.
        path: PathBuf,
        /// Why not.
        why: String,
    },
    /// mkfs.ext4 failed.
    #[error("mkfs.ext4: {0}")]
    Mkfs(String),
}

impl ImageError {
    /// The error is the caller's input (SOURCE is no image, or missing),
    /// not a failure while building.
    pub fn is_usage_error(&self) -> bool {
        match self {
            ImageError::UnknownFormat(_) => true,
            ImageError::Io {
                what: "open",
                source,
                ..
            } => source.kind() == std::io::ErrorKind::NotFound,
            _ => false,
        }
    }
}

impl ImageError {
    fn io(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { what, path, source }
    }
}

/// What to build.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// The image: OCI layout directory, OCI archive or docker-save tarball.
    pub source: PathBuf,
    /// The ext4 file to write.
    pub output: PathBuf,
    /// Image size in MiB; default: contents + 25% + 64 MiB.
    pub size_mib: Option<u64>,
    /// The static `microvm-init` binary to put in the image.
    pub init: PathBuf,
    /// Progress lines on stderr.
    pub progress: bool,
}

/// What was built.
#[derive(Debug)]
pub struct Built {
    /// What the init will run.
    pub config: microvm_init::ImageConfig,
    /// Number of layers applied.
    pub layers: usize,
    /// Size of the ext4 image in MiB.
    pub size_mib: u64,
}

/// Progress on stderr, with the time since the build started.
struct Progress {
    on: bool,
    start: Instant,
}

impl Progress {
    fn say(&self, msg: &str) {
        if self.on {
            crate::say!("[image {:6.1}s] {msg}", self.start.elapsed().as_secs_f64());
        }
    }
}

/// A directory removed (with everything in it) when dropped: the staging
/// tree and the temporary image, so that a failed build leaves nothing.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Build the image described by `opts`.
pub fn build(opts: &BuildOptions) -> Result<Built, ImageError> {
    let progress = Progress {
        on: opts.progress,
        start: Instant::now(),
    };
    inject::check_init_binary(&opts.init)?;
    let image = source::open(&opts.source)?;
    progress.say(&format!(
        "{}: {} layer(s), {}",
        image.format,
        image.layers.len(),
        image.platform
    ));
    let config = image.init_config();

    // Staging next to the output: same file system, so the final rename is atomic.
    let out_dir = match opts.output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = opts
        .output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let scratch_path = out_dir.join(format!(".{name}.build-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch_path);
    std::fs::create_dir(&scratch_path).map_err(ImageError::io("create", &scratch_path))?;
    let scratch = Scratch(scratch_path);
    let root = scratch.0.join("root");
    std::fs::create_dir(&root).map_err(ImageError::io("create", &root))?;
    set_mode(&root, 0o755)?;

    let mut applier = layer::Applier::new(&root)?;
    for (i, l) in image.layers.iter().enumerate() {
        progress.say(&format!(
            "layer {}/{}: {} ({} MiB {})",
            i + 1,
            image.layers.len(),
            l.name,
            l.size.map(|s| s >> 20).unwrap_or(0),
            l.compression
        ));
        let blob = image.store.open(&l.path)?;
        applier.apply(i + 1, blob, l, &|m| progress.say(m))?;
    }
    progress.say("adding microvm-init and /etc/microvm/init.conf");
    inject::inject(&applier, &opts.init, &config)?;

    let tmp_image = scratch.0.join("image.ext4");
    let size_mib = ext4::make(&root, &tmp_image, opts.size_mib, &|m| progress.say(m))?;
    std::fs::rename(&tmp_image, &opts.output).map_err(ImageError::io("rename to", &opts.output))?;
    progress.say(&format!("wrote {} ({size_mib} MiB)", opts.output.display()));
    Ok(Built {
        config,
        layers: image.layers.len(),
        size_mib,
    })
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(ImageError::io("chmod", path))
}

#[cfg(test)]
mod tests;
