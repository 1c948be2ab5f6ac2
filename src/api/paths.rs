//! The host paths an API client may name for a volume: only files and block devices under
//! the daemon's volume roots (`serve --volume-root`, and always `<state>/volumes`).
//!
//! Anyone who can reach the API socket is as privileged as the daemon for these roots, and
//! only for them: a path is compared after symlinks are resolved, and every file is checked
//! again *after* it is opened, through the descriptor (`/proc/self/fd/N` names the file that
//! was really opened), so a symlink or directory swapped in between the check and the open
//! is caught. New files are created with `openat(O_CREAT | O_EXCL | O_NOFOLLOW)` in a
//! directory that was itself opened and checked.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use super::ApiError;

/// The canonical roots.
#[derive(Debug, Clone)]
pub struct VolumeRoots {
    roots: Vec<PathBuf>,
}

/// Where the descriptor `f` really points (`/proc/self/fd/N`).
fn real_path(f: &File) -> std::io::Result<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

impl VolumeRoots {
    /// `own` (the daemon's volume directory) and the `listed` roots, each resolved. A root
    /// is a directory, or a single file or block device.
    pub fn new(own: &Path, listed: &[PathBuf]) -> Result<VolumeRoots, String> {
        let mut roots = Vec::new();
        for r in std::iter::once(&own.to_path_buf()).chain(listed) {
            let c = std::fs::canonicalize(r)
                .map_err(|e| format!("--volume-root {}: {e}", r.display()))?;
            if !roots.contains(&c) {
                roots.push(c);
            }
        }
        Ok(VolumeRoots { roots })
    }

    /// Whether the resolved path `p` is a root or under one.
    fn allows(&self, p: &Path) -> bool {
        self.roots.iter().any(|r| p.starts_with(r))
    }

    fn outside(&self, p: &Path) -> ApiError {
        let list: Vec<String> = self.roots.iter().map(|r| r.display().to_string()).collect();
        ApiError::forbidden(format!(
            "{} is outside the volume roots ({}): the daemon serves only files and devices under a --volume-root",
            p.display(),
            list.join(", ")
        ))
    }

    /// The resolved form of `p`, checked to be under a root. A path that does not resolve
    /// is refused as outside when it is not under a root as written (so that the API does
    /// not tell what exists elsewhere).
    fn resolve(&self, p: &Path) -> Result<PathBuf, ApiError> {
        if !p.is_absolute() {
            return Err(ApiError::bad(format!(
                "{}: give an absolute path",
                p.display()
            )));
        }
        match std::fs::canonicalize(p) {
            Ok(c) if self.allows(&c) => Ok(c),
            Ok(_) => Err(self.outside(p)),
            Err(_) if !self.allows(p) => Err(self.outside(p)),
            Err(e) => Err(ApiError::bad(format!("{}: {e}", p.display()))),
        }
    }

    /// Checks, after the open, that `f` is the file at `want` (no component of the path was
    /// swapped since it was resolved) and that it is under a root.
    pub fn check_open(&self, f: &File, want: &Path) -> Result<(), ApiError> {
        let real =
            real_path(f).map_err(|e| ApiError::internal(format!("{}: {e}", want.display())))?;
        if real != want || !self.allows(&real) {
            return Err(ApiError::forbidden(format!(
                "{} changed while it was opened (it is now {}): refused",
                want.display(),
                real.display()
            )));
        }
        Ok(())
    }

    /// Opens an existing file or block device under a root (read-only, or read-write with
    /// `write`; not following a symlink at the last component). Returns its resolved path
    /// and the open file.
    pub fn open_existing(&self, p: &Path, write: bool) -> Result<(PathBuf, File), ApiError> {
        let c = self.resolve(p)?;
        let f = OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&c)
            .map_err(|e| ApiError::bad(format!("{}: {e}", p.display())))?;
        self.check_open(&f, &c)?;
        let t = f
            .metadata()
            .map_err(|e| ApiError::bad(format!("{}: {e}", p.display())))?
            .file_type();
        if !t.is_file() && !t.is_block_device() {
            return Err(ApiError::bad(format!(
                "{} is neither a regular file nor a block device",
                p.display()
            )));
        }
        Ok((c, f))
    }

    /// Opens the directory that holds `p` (which must be under a root, as must the
    /// directory), and returns it with `p`'s file name.
    fn parent_dir<'a>(&self, p: &'a Path) -> Result<(PathBuf, File, &'a OsStr), ApiError> {
        let name = match p.components().next_back() {
            Some(Component::Normal(n)) => n,
            _ => {
                return Err(ApiError::bad(format!(
                    "{}: the path must end in a file name",
                    p.display()
                )))
            }
        };
        let parent = p.parent().unwrap_or(Path::new("/"));
        let c = self.resolve(parent)?;
        if !self.allows(&c.join(name)) {
            return Err(self.outside(p));
        }
        let dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(&c)
            .map_err(|e| ApiError::bad(format!("{}: {e}", parent.display())))?;
        let real = real_path(&dir).map_err(|e| ApiError::internal(e.to_string()))?;
        if real != c {
            return Err(ApiError::forbidden(format!(
                "{} changed while it was opened: refused",
                parent.display()
            )));
        }
        Ok((c, dir, name))
    }

    /// Creates a new file at `p` (mode 0600), under a root: never through a symlink, never
    /// over an existing file. Returns its resolved path and the open file.
    pub fn create(&self, p: &Path) -> Result<(PathBuf, File), ApiError> {
        let (dir_path, dir, name) = self.parent_dir(p)?;
        let f = crate::sys::create_at(&dir, name, 0o600)
            .map_err(|e| ApiError::conflict(format!("cannot create {}: {e}", p.display())))?;
        Ok((dir_path.join(name), f))
    }

    /// Removes the file at `p` (a volume's file the daemon created), through its checked
    /// directory.
    pub fn remove(&self, p: &Path) -> Result<(), ApiError> {
        let (_, dir, name) = self.parent_dir(p)?;
        crate::sys::unlink_at(&dir, name)
            .map_err(|e| ApiError::internal(format!("cannot remove {}: {e}", p.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_outside_or_escaping_the_roots_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("in.img"), [0u8; 512]).unwrap();
        std::fs::write(d.path().join("out.img"), [0u8; 512]).unwrap();
        std::os::unix::fs::symlink(d.path().join("out.img"), root.join("link.img")).unwrap();
        std::os::unix::fs::symlink(d.path(), root.join("up")).unwrap();
        let r = VolumeRoots::new(&root, &[]).unwrap();
        assert!(r.open_existing(&root.join("in.img"), false).is_ok());
        for p in [
            d.path().join("out.img"),
            root.join("link.img"),
            root.join("up/out.img"),
            root.join("../out.img"),
            PathBuf::from("/etc/passwd"),
            PathBuf::from("/nonexistent/x"),
        ] {
            let e = r.open_existing(&p, false).unwrap_err();
            assert_eq!(e.status, 403, "{}: {e}", p.display());
        }
        let e = r.create(&root.join("up/new.img")).unwrap_err();
        assert_eq!(e.status, 403, "{e}");
        assert!(!d.path().join("new.img").exists());
        let (c, _) = r.create(&root.join("new.img")).unwrap();
        assert_eq!(c, root.canonicalize().unwrap().join("new.img"));
        assert_eq!(r.create(&root.join("new.img")).unwrap_err().status, 409);
        assert_eq!(r.create(&root.join("link.img")).unwrap_err().status, 409);
        r.remove(&c).unwrap();
        assert!(!c.exists());
    }
}
