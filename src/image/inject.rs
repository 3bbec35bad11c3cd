//! What microvm adds to every image: its init and the image config the init
//! reads, the mount points the init needs, and the files a container runtime
//! would otherwise provide (`/etc/hosts`, `/etc/resolv.conf`).

use std::io::Read;
use std::path::Path;

use super::layer::Applier;
use super::ImageError;

/// Where the init goes; `/sbin/init` becomes a symlink to it, so the kernel's
/// default init search finds it with no `init=` parameter.
pub const INIT_PATH: &str = "sbin/microvm-init";

/// The init must be an x86-64 ELF without a program interpreter: the image
/// may have no libc (or another one).
pub fn check_init_binary(path: &Path) -> Result<(), ImageError> {
    let why = |why: &str| ImageError::Init {
        path: path.to_path_buf(),
        why: why.to_string(),
    };
    let mut f = std::fs::File::open(path).map_err(|e| why(&e.to_string()))?;
    let mut head = Vec::new();
    f.by_ref()
        .take(64 << 10)
        .read_to_end(&mut head)
        .map_err(|e| why(&e.to_string()))?;
    let u16_at = |o: usize| head.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| {
        head.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    // ELF64, little endian, EM_X86_64.
    if head.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) || u16_at(18) != Some(62) {
        return Err(why("not an x86-64 ELF executable"));
    }
    let phoff = u64_at(32).and_then(|v| usize::try_from(v).ok());
    let phentsize = u16_at(54).map(usize::from);
    let phnum = u16_at(56).map(usize::from);
    let (Some(phoff), Some(phentsize), Some(phnum)) = (phoff, phentsize, phnum) else {
        return Err(why("truncated ELF header"));
    };
    for i in 0..phnum {
        let off = phoff.saturating_add(i.saturating_mul(phentsize));
        let Some(ty) = head.get(off..off + 4) else {
            return Err(why("program headers beyond the first 64 KiB"));
        };
        if ty == [3, 0, 0, 0] {
            return Err(why(
                "dynamically linked (PT_INTERP); build it with init/build.sh (static)",
            ));
        }
    }
    Ok(())
}

/// Add the init, its config and the basics to the staging tree.
pub fn inject(
    applier: &Applier,
    init: &Path,
    config: &microvm_init::ImageConfig,
) -> Result<(), ImageError> {
    let root = applier.dir_inside(0, "/", Path::new(""))?;
    for (dir, mode) in [
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("run", 0o755),
        ("tmp", 0o1777),
    ] {
        let p = root.join(dir);
        if std::fs::symlink_metadata(&p).is_err() {
            std::fs::create_dir(&p).map_err(ImageError::io("create", &p))?;
            super::set_mode(&p, mode)?;
        }
    }

    let sbin = applier.dir_inside(0, INIT_PATH, Path::new("sbin"))?;
    let dst = sbin.join("microvm-init");
    replace(&dst)?;
    std::fs::copy(init, &dst).map_err(ImageError::io("copy the init to", &dst))?;
    super::set_mode(&dst, 0o755)?;
    let link = sbin.join("init");
    replace(&link)?;
    std::os::unix::fs::symlink("microvm-init", &link).map_err(ImageError::io("symlink", &link))?;

    let etc_microvm = applier.dir_inside(0, microvm_init::CONFIG_PATH, Path::new("etc/microvm"))?;
    let conf = etc_microvm.join("init.conf");
    replace(&conf)?;
    std::fs::write(&conf, config.to_text()).map_err(ImageError::io("write", &conf))?;
    super::set_mode(&conf, 0o644)?;

    // What `docker run` provides: a hosts file, and DNS servers (the kernel's
    // `ip=` autoconfiguration publishes them in /proc/net/pnp).
    let etc = applier.dir_inside(0, "/etc", Path::new("etc"))?;
    let hosts = etc.join("hosts");
    if std::fs::symlink_metadata(&hosts).is_err() {
        std::fs::write(
            &hosts,
            format!(
                "127.0.0.1\tlocalhost\n127.0.1.1\t{h}\n::1\t\tlocalhost ip6-localhost ip6-loopback\n",
                h = microvm_init::HOSTNAME
            ),
        )
        .map_err(ImageError::io("write", &hosts))?;
    }
    let resolv = etc.join("resolv.conf");
    let empty = std::fs::symlink_metadata(&resolv).map(|m| m.is_file() && m.len() == 0);
    if empty.unwrap_or(true) {
        replace(&resolv)?;
        std::os::unix::fs::symlink("/proc/net/pnp", &resolv)
            .map_err(ImageError::io("symlink", &resolv))?;
    }
    Ok(())
}

/// Make room for a file at `path`: whatever is there goes (never followed).
fn replace(path: &Path) -> Result<(), ImageError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => Ok(()),
    }
    .map_err(ImageError::io("replace", path))
}
