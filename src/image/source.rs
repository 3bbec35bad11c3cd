//! Reading an image: where its blobs are (a directory, or sections of an
//! outer tar read in place), which manifest, config and layers it has, and
//! digest checks on everything read.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType};
use sha2::{Digest as _, Sha256};

use super::ImageError;

/// Largest JSON document (index, manifest, config) read into memory.
const MAX_JSON: u64 = 16 << 20;
/// Symlinks followed when looking a path up in an outer tar.
const MAX_TAR_LINKS: usize = 8;

/// How a layer is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// tar+gzip.
    Gzip,
    /// tar+zstd.
    Zstd,
    /// Docker archives do not say: decided by the first bytes.
    Sniff,
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "tar",
            Self::Gzip => "tar+gzip",
            Self::Zstd => "tar+zstd",
            Self::Sniff => "tar",
        })
    }
}

/// One layer to apply.
#[derive(Clone, Debug)]
pub struct LayerRef {
    /// Path of the blob in the store.
    pub path: String,
    /// For messages: the digest or file name.
    pub name: String,
    /// How the blob is compressed.
    pub compression: Compression,
    /// Digest and size of the blob as stored (OCI), if known.
    pub blob_digest: Option<String>,
    /// Size of the blob as stored, if known.
    pub size: Option<u64>,
    /// sha256 of the uncompressed tar (`rootfs.diff_ids`), `sha256:...`.
    pub diff_id: Option<String>,
}

/// Where blobs are read from.
pub enum Store {
    /// An unpacked layout directory.
    Dir(PathBuf),
    /// A tar file read in place: path -> (data offset, size), and symlink or
    /// hard link entries -> their target path in the archive.
    Tar {
        file: PathBuf,
        files: HashMap<String, (u64, u64)>,
        links: HashMap<String, String>,
    },
}

/// `a/./b/` -> `a/b`; None if it climbs (`..`) or is absolute.
fn normalize(p: &str) -> Option<String> {
    let mut parts = Vec::new();
    for c in Path::new(p).components() {
        match c {
            Component::Normal(s) => parts.push(s.to_str()?.to_string()),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(parts.join("/"))
}

impl Store {
    fn open_tar(path: &Path) -> Result<Self, ImageError> {
        let f = File::open(path).map_err(ImageError::io("open", path))?;
        let mut ar = tar::Archive::new(f);
        let mut files = HashMap::new();
        let mut links = HashMap::new();
        let entries = ar.entries().map_err(ImageError::io("read tar", path))?;
        for e in entries {
            let e = e.map_err(ImageError::io("read tar", path))?;
            let Ok(p) = e.path() else { continue };
            let Some(name) = p.to_str().and_then(normalize) else {
                continue; // never looked up: names we ask for are normal
            };
            let kind = e.header().entry_type();
            if kind.is_file() || kind == tar::EntryType::Continuous {
                files.insert(name, (e.raw_file_position(), e.size()));
            } else if kind.is_symlink() || kind.is_hard_link() {
                let Ok(Some(target)) = e.link_name() else {
                    continue;
                };
                let target = target.to_string_lossy().into_owned();
                // Symlinks are relative to their directory, hard links to the archive root.
                let joined = if kind.is_symlink() {
                    match name.rsplit_once('/') {
                        Some((dir, _)) => format!("{dir}/{target}"),
                        None => target,
                    }
                } else {
                    target
                };
                if let Some(t) = resolve_dots(&joined) {
                    links.insert(name, t);
                }
            }
        }
        Ok(Self::Tar {
            file: path.to_path_buf(),
            files,
            links,
        })
    }

    /// Does the store have this (normalized) path?
    fn has(&self, name: &str) -> bool {
        match self {
            Self::Dir(d) => d.join(name).is_file(),
            Self::Tar { .. } => self.tar_lookup(name).is_some(),
        }
    }

    fn tar_lookup(&self, name: &str) -> Option<(u64, u64)> {
        let Self::Tar { files, links, .. } = self else {
            return None;
        };
        let mut cur = name.to_string();
        for _ in 0..=MAX_TAR_LINKS {
            if let Some(v) = files.get(&cur) {
                return Some(*v);
            }
            cur = links.get(&cur)?.clone();
        }
        None
    }

    /// A reader for the blob at `name` (a path inside the layout).
    pub fn open(&self, name: &str) -> Result<Box<dyn Read + Send>, ImageError> {
        let norm = normalize(name).ok_or_else(|| ImageError::MissingBlob(name.to_string()))?;
        match self {
            Self::Dir(d) => {
                let p = d.join(&norm);
                match File::open(&p) {
                    Ok(f) => Ok(Box::new(f)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        Err(ImageError::MissingBlob(name.to_string()))
                    }
                    Err(e) => Err(ImageError::io("open", p)(e)),
                }
            }
            Self::Tar { file, .. } => {
                let (off, size) = self
                    .tar_lookup(&norm)
                    .ok_or_else(|| ImageError::MissingBlob(name.to_string()))?;
                let mut f = File::open(file).map_err(ImageError::io("open", file))?;
                f.seek(SeekFrom::Start(off))
                    .map_err(ImageError::io("seek in", file))?;
                Ok(Box::new(f.take(size)))
            }
        }
    }

    /// The whole blob, at most [`MAX_JSON`] bytes.
    fn read_small(&self, name: &str) -> Result<Vec<u8>, ImageError> {
        let mut buf = Vec::new();
        self.open(name)?
            .take(MAX_JSON + 1)
            .read_to_end(&mut buf)
            .map_err(|e| ImageError::Layer {
                layer: 0,
                what: format!("read {name}"),
                source: e,
            })?;
        if buf.len() as u64 > MAX_JSON {
            return Err(ImageError::Malformed(format!(
                "{name}: larger than {MAX_JSON} bytes"
            )));
        }
        Ok(buf)
    }
}

/// `a/b/../c` -> `a/c`; None if it climbs out.
fn resolve_dots(p: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

/// `sha256:<64 lowercase hex>` -> the hex part.
pub fn sha256_hex(digest: &str) -> Result<&str, ImageError> {
    match digest.split_once(':') {
        Some(("sha256", hex))
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(hex)
        }
        _ => Err(ImageError::BadDigest(digest.to_string())),
    }
}

/// `sha256:<hex>` of `data`.
pub fn sha256_of(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn check_digest(what: &str, expected: &str, data: &[u8]) -> Result<(), ImageError> {
    let actual = sha256_of(data);
    if actual != expected {
        return Err(ImageError::Digest {
            what: what.to_string(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
}

/// A reader that hashes and counts what passes through it; the result is
/// shared so that it can be read after the reader was handed to a decoder.
pub struct Digesting<R> {
    inner: R,
    state: Arc<Mutex<(Sha256, u64)>>,
}

/// The other end of a [`Digesting`] reader.
#[derive(Clone)]
pub struct DigestHandle(Arc<Mutex<(Sha256, u64)>>);

impl<R: Read> Digesting<R> {
    /// Wrap `inner`.
    pub fn new(inner: R) -> (Self, DigestHandle) {
        let state = Arc::new(Mutex::new((Sha256::new(), 0)));
        (
            Self {
                inner,
                state: state.clone(),
            },
            DigestHandle(state),
        )
    }
}

impl<R: Read> Read for Digesting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut st = self
            .state
            .lock()
            .map_err(|_| std::io::Error::other("digest state poisoned"))?;
        st.0.update(&buf[..n]);
        st.1 += n as u64;
        Ok(n)
    }
}

impl DigestHandle {
    /// `sha256:<hex>` and byte count of everything read so far.
    pub fn finish(&self) -> (String, u64) {
        match self.0.lock() {
            Ok(st) => (format!("sha256:{}", hex(&st.0.clone().finalize())), st.1),
            Err(_) => (String::new(), 0),
        }
    }
}

/// An opened image.
pub struct Image {
    /// "OCI layout", "OCI archive" or "docker archive".
    pub format: &'static str,
    /// Where the blobs are.
    pub store: Store,
    /// The image config.
    pub config: ImageConfiguration,
    /// Layers, bottom first.
    pub layers: Vec<LayerRef>,
    /// `os/arch` for messages.
    pub platform: String,
}

impl Image {
    /// The part of the config the guest init needs.
    pub fn init_config(&self) -> microvm_init::ImageConfig {
        let mut c = microvm_init::ImageConfig::default();
        if let Some(cfg) = self.config.config() {
            c.entrypoint = cfg.entrypoint().clone().unwrap_or_default();
            c.cmd = cfg.cmd().clone().unwrap_or_default();
            c.env = cfg.env().clone().unwrap_or_default();
            c.working_dir = cfg.working_dir().clone().unwrap_or_default();
            c.user = cfg.user().clone().unwrap_or_default();
            for p in cfg.exposed_ports().iter().flatten() {
                // "80/tcp", or "80" (tcp by default); udp/sctp ports are not checked.
                let (num, proto) = p.split_once('/').unwrap_or((p, "tcp"));
                if proto == "tcp" {
                    if let Ok(n) = num.parse::<u16>() {
                        c.tcp_ports.push(n);
                    }
                }
            }
        }
        c
    }
}

/// Open SOURCE, whichever of the three formats it is.
pub fn open(source: &Path) -> Result<Image, ImageError> {
    let meta = std::fs::metadata(source).map_err(ImageError::io("open", source))?;
    let (store, archive) = if meta.is_dir() {
        (Store::Dir(source.to_path_buf()), false)
    } else {
        // The first tar header: compression magic at 0, "ustar" at 257 (the
        // POSIX and GNU formats, which docker save and OCI tools write).
        let mut head = [0u8; 512];
        let mut f = File::open(source).map_err(ImageError::io("open", source))?;
        let mut n = 0;
        while n < head.len() {
            match f
                .read(&mut head[n..])
                .map_err(ImageError::io("read", source))?
            {
                0 => break,
                k => n += k,
            }
        }
        if n >= 2 && head[..2] == [0x1f, 0x8b] || n >= 4 && head[..4] == [0x28, 0xb5, 0x2f, 0xfd] {
            return Err(ImageError::Malformed(format!(
                "'{}' is compressed: decompress it first (docker save and OCI archives are plain tar)",
                source.display()
            )));
        }
        if n < head.len() || &head[257..262] != b"ustar" {
            return Err(ImageError::UnknownFormat(source.to_path_buf()));
        }
        (Store::open_tar(source)?, true)
    };
    if store.has("index.json") {
        let format = if archive { "OCI archive" } else { "OCI layout" };
        open_oci(store, format)
    } else if store.has("manifest.json") {
        open_docker(store)
    } else {
        Err(ImageError::UnknownFormat(source.to_path_buf()))
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(what: &str, data: &[u8]) -> Result<T, ImageError> {
    serde_json::from_slice(data).map_err(|e| ImageError::Json(what.to_string(), e))
}

/// A descriptor's blob, read whole and checked against its digest and size.
fn read_blob(store: &Store, d: &Descriptor, what: &str) -> Result<Vec<u8>, ImageError> {
    let digest = d.digest().to_string();
    let hex = sha256_hex(&digest)?;
    let data = store.read_small(&format!("blobs/sha256/{hex}"))?;
    check_digest(what, &digest, &data)?;
    if data.len() as u64 != d.size() {
        return Err(ImageError::Malformed(format!(
            "{what}: size {} but descriptor says {}",
            data.len(),
            d.size()
        )));
    }
    Ok(data)
}

fn is_index(m: &MediaType) -> bool {
    matches!(m, MediaType::ImageIndex)
        || m.to_string() == "application/vnd.docker.distribution.manifest.list.v2+json"
}

fn is_manifest(m: &MediaType) -> bool {
    matches!(m, MediaType::ImageManifest)
        || m.to_string() == "application/vnd.docker.distribution.manifest.v2+json"
}

/// Pick the linux/amd64 manifest of an index (following nested indexes).
fn pick_manifest(
    store: &Store,
    index: &ImageIndex,
    depth: usize,
) -> Result<Descriptor, ImageError> {
    if depth > 4 {
        return Err(ImageError::Malformed(
            "image indexes nested too deep".into(),
        ));
    }
    let wanted = |d: &&Descriptor| {
        d.platform().as_ref().is_none_or(|p| {
            p.os().to_string() == "linux" && p.architecture().to_string() == "amd64"
        })
    };
    let candidates: Vec<&Descriptor> = index
        .manifests()
        .iter()
        .filter(|d| is_manifest(d.media_type()) || is_index(d.media_type()))
        .filter(wanted)
        .collect();
    let d = match candidates.as_slice() {
        [] if index.manifests().is_empty() => {
            return Err(ImageError::Malformed("index.json lists no image".into()))
        }
        [] => {
            let types: Vec<String> = index
                .manifests()
                .iter()
                .map(|d| d.media_type().to_string())
                .collect();
            if index
                .manifests()
                .iter()
                .all(|d| !is_manifest(d.media_type()) && !is_index(d.media_type()))
            {
                return Err(ImageError::MediaType(types.join(", ")));
            }
            return Err(ImageError::Platform(
                "no linux/amd64 image in the index".into(),
            ));
        }
        [one] => *one,
        many => {
            return Err(ImageError::Malformed(format!(
                "the index lists {} linux/amd64 images; keep one in the layout",
                many.len()
            )))
        }
    };
    if is_index(d.media_type()) {
        let data = read_blob(store, d, "nested index")?;
        let nested: ImageIndex = parse_json("nested index", &data)?;
        return pick_manifest(store, &nested, depth + 1);
    }
    Ok(d.clone())
}

fn layer_compression(m: &MediaType) -> Result<Compression, ImageError> {
    Ok(match m {
        MediaType::ImageLayer | MediaType::ImageLayerNonDistributable => Compression::None,
        MediaType::ImageLayerGzip | MediaType::ImageLayerNonDistributableGzip => Compression::Gzip,
        MediaType::ImageLayerZstd | MediaType::ImageLayerNonDistributableZstd => Compression::Zstd,
        other => match other.to_string().as_str() {
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Compression::Gzip,
            "application/vnd.docker.image.rootfs.diff.tar" => Compression::None,
            t => return Err(ImageError::MediaType(t.to_string())),
        },
    })
}

fn check_platform(config: &ImageConfiguration) -> Result<String, ImageError> {
    let platform = format!("{}/{}", config.os(), config.architecture());
    if platform != "linux/amd64" {
        return Err(ImageError::Platform(platform));
    }
    Ok(platform)
}

fn open_oci(store: Store, format: &'static str) -> Result<Image, ImageError> {
    let data = store.read_small("index.json")?;
    let index: ImageIndex = parse_json("index.json", &data)?;
    let md = pick_manifest(&store, &index, 0)?;
    let data = read_blob(&store, &md, "manifest")?;
    let manifest: ImageManifest = parse_json("manifest", &data)?;
    let cd = manifest.config();
    let ct = cd.media_type().to_string();
    if !matches!(cd.media_type(), MediaType::ImageConfig)
        && ct != "application/vnd.docker.container.image.v1+json"
    {
        return Err(ImageError::MediaType(ct));
    }
    let data = read_blob(&store, cd, "config")?;
    let config: ImageConfiguration = parse_json("config", &data)?;
    let platform = check_platform(&config)?;
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != manifest.layers().len() {
        return Err(ImageError::Malformed(format!(
            "manifest has {} layers, config lists {} diff_ids",
            manifest.layers().len(),
            diff_ids.len()
        )));
    }
    let mut layers = Vec::new();
    for (d, diff_id) in manifest.layers().iter().zip(diff_ids) {
        let digest = d.digest().to_string();
        let hex = sha256_hex(&digest)?;
        sha256_hex(diff_id)?;
        layers.push(LayerRef {
            path: format!("blobs/sha256/{hex}"),
            name: digest.chars().take(19).collect(),
            compression: layer_compression(d.media_type())?,
            blob_digest: Some(digest.clone()),
            size: Some(d.size()),
            diff_id: Some(diff_id.clone()),
        });
    }
    Ok(Image {
        format,
        store,
        config,
        layers,
        platform,
    })
}

/// One image of a docker-save `manifest.json`.
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    layers: Vec<String>,
}

fn open_docker(store: Store) -> Result<Image, ImageError> {
    let data = store.read_small("manifest.json")?;
    let mut list: Vec<DockerManifest> = parse_json("manifest.json", &data)?;
    if list.len() != 1 {
        return Err(ImageError::Malformed(format!(
            "manifest.json lists {} images; save one",
            list.len()
        )));
    }
    let m = list.remove(0);
    // The config's name is its digest: `<hex>.json` (docker, skopeo) or
    // `blobs/sha256/<hex>` (docker 25 and later).
    let base = m.config.rsplit('/').next().unwrap_or_default();
    let hex = base.strip_suffix(".json").unwrap_or(base);
    let expected = format!("sha256:{hex}");
    sha256_hex(&expected).map_err(|_| {
        ImageError::Malformed(format!(
            "config '{}' is not named by its digest: cannot verify it",
            m.config
        ))
    })?;
    let data = store.read_small(&m.config)?;
    check_digest("config", &expected, &data)?;
    let config: ImageConfiguration = parse_json("config", &data)?;
    let platform = check_platform(&config)?;
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != m.layers.len() {
        return Err(ImageError::Malformed(format!(
            "manifest.json has {} layers, config lists {} diff_ids",
            m.layers.len(),
            diff_ids.len()
        )));
    }
    let mut layers = Vec::new();
    for (path, diff_id) in m.layers.iter().zip(diff_ids) {
        sha256_hex(diff_id)?;
        layers.push(LayerRef {
            path: path.clone(),
            name: path.clone(),
            compression: Compression::Sniff,
            blob_digest: None,
            size: None,
            diff_id: Some(diff_id.clone()),
        });
    }
    Ok(Image {
        format: "docker archive",
        store,
        config,
        layers,
        platform,
    })
}
