//! A disk: its backing (file, block device or null), its geometry, its guest-visible cache
//! mode and its counters. One `Disk` lives as long as the daemon and is shared by every
//! frontend connection and queue worker that serves it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::{Backing, DiskConfig};
use crate::request::Geometry;
use crate::stats::DiskStats;
use crate::sys;
use crate::virtio_blk::{self, ConfigSpace, SECTOR_SHIFT, SECTOR_SIZE};

/// Errors opening a disk's backing.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is neither a regular file nor a block device")]
    NotFileOrDevice(PathBuf),
    #[error("{path} is {size} bytes, not a multiple of 512")]
    SizeNotSectorMultiple { path: PathBuf, size: u64 },
    #[error("{0} is empty")]
    Empty(PathBuf),
    #[error("cannot query the size of {path}")]
    Query {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The open files behind a disk.
pub struct Files {
    /// Registered as fixed file 0: O_DIRECT when `direct`.
    pub main: File,
    /// Registered as fixed file 1 when `direct`: the page-cache path for requests whose
    /// buffers O_DIRECT cannot take (misaligned guest buffers).
    pub buffered: Option<File>,
    pub is_block_device: bool,
    /// Alignment O_DIRECT needs for buffers, lengths and offsets.
    pub dio_align: u32,
}

pub struct Disk {
    pub config: DiskConfig,
    pub files: Option<Files>,
    pub capacity_sectors: u64,
    pub logical_block: u32,
    pub physical_block: u32,
    pub serial: String,
    writeback: AtomicBool,
    pub stats: DiskStats,
    /// The replication stage, for a disk with a `volume` (set once, before serving).
    pub repl: std::sync::OnceLock<std::sync::Arc<crate::repl::primary::Replication>>,
}

impl Disk {
    /// Opens the backing named by `config`.
    pub fn open(config: DiskConfig) -> Result<Disk, DiskError> {
        let (files, size, logical, physical) = match &config.backing {
            Backing::Null { size } => (None, *size, 512, 512),
            Backing::Path(path) => open_path(path, &config)?,
        };
        let serial = config.serial_or_default();
        let stats = DiskStats::new(config.queues);
        Ok(Disk {
            writeback: AtomicBool::new(config.writeback),
            capacity_sectors: size >> SECTOR_SHIFT,
            logical_block: logical,
            physical_block: physical,
            files,
            serial,
            stats,
            config,
            repl: std::sync::OnceLock::new(),
        })
    }

    pub fn geometry(&self) -> Geometry {
        Geometry {
            capacity_sectors: self.capacity_sectors,
            readonly: self.config.readonly,
        }
    }

    /// True while the guest runs the disk with a volatile write cache (flushes required).
    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }

    pub fn set_writeback(&self, on: bool) {
        self.writeback.store(on, Ordering::Relaxed);
    }

    pub fn config_space(&self) -> ConfigSpace {
        let ratio = (self.physical_block / self.logical_block).max(1);
        ConfigSpace {
            capacity_sectors: self.capacity_sectors,
            seg_max: virtio_blk::seg_max(self.config.queue_size),
            blk_size: self.logical_block,
            physical_block_exp: ratio.trailing_zeros() as u8,
            num_queues: self.config.queues,
            writeback: self.writeback(),
        }
    }

    /// Makes everything written so far durable (used at shutdown).
    pub fn sync(&self) -> io::Result<()> {
        match &self.files {
            Some(f) if !self.config.readonly => f.main.sync_data(),
            _ => Ok(()),
        }
    }
}

fn open_path(
    path: &PathBuf,
    config: &DiskConfig,
) -> Result<(Option<Files>, u64, u32, u32), DiskError> {
    let open = |direct: bool| {
        let mut o = OpenOptions::new();
        o.read(true).write(!config.readonly);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(path).map_err(|source| DiskError::Open {
            path: path.clone(),
            source,
        })
    };
    let probe = open(false)?;
    let meta = probe.metadata().map_err(|source| DiskError::Query {
        path: path.clone(),
        source,
    })?;
    let is_block_device = meta.file_type().is_block_device();
    if !is_block_device && !meta.file_type().is_file() {
        return Err(DiskError::NotFileOrDevice(path.clone()));
    }
    let (size, logical, physical) = if is_block_device {
        let info = sys::block_device_info(&probe).map_err(|source| DiskError::Query {
            path: path.clone(),
            source,
        })?;
        (info.size, info.logical_block, info.physical_block)
    } else {
        (meta.len(), 512, 4096)
    };
    if size == 0 {
        return Err(DiskError::Empty(path.clone()));
    }
    if size % SECTOR_SIZE != 0 {
        return Err(DiskError::SizeNotSectorMultiple {
            path: path.clone(),
            size,
        });
    }
    let direct = config.direct.unwrap_or(is_block_device);
    let files = if direct {
        let main = open(true)?;
        let dio_align = sys::dio_alignment(&main).unwrap_or(logical).max(logical);
        Files {
            main,
            buffered: Some(probe),
            is_block_device,
            dio_align,
        }
    } else {
        Files {
            main: probe,
            buffered: None,
            is_block_device,
            dio_align: 1,
        }
    };
    Ok((Some(files), size, logical, physical))
}
