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
    /// Changed only by [`Disk::resize`]; each batch reads it once.
    capacity_sectors: std::sync::atomic::AtomicU64,
    pub logical_block: u32,
    pub physical_block: u32,
    pub serial: String,
    writeback: AtomicBool,
    pub stats: DiskStats,
    /// Latency histograms, per queue and request kind.
    pub metrics: crate::metrics::DiskMetrics,
    /// The replication stage, for a disk with a `volume` (set once, before serving).
    pub repl: std::sync::OnceLock<std::sync::Arc<crate::repl::primary::Replication>>,
    /// The current frontend's backend-request channel (VHOST_USER_SET_BACKEND_REQ_FD), used
    /// to tell it that the configuration (the capacity) changed.
    pub backend_channel: std::sync::Mutex<Option<std::os::unix::net::UnixStream>>,
    /// The attachment's driver image (`None`: requests go straight on), swapped only at a
    /// quiesce point; workers notice a swap by the generation.
    driver: std::sync::Mutex<Option<std::sync::Arc<crate::driver::Driver>>>,
    pub driver_generation: std::sync::atomic::AtomicU64,
    /// While set, workers take nothing new from the rings (an upgrade is draining them).
    pub paused: AtomicBool,
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
        let metrics = crate::metrics::DiskMetrics::new(config.queues, config.latency_range);
        Ok(Disk {
            writeback: AtomicBool::new(config.writeback),
            capacity_sectors: std::sync::atomic::AtomicU64::new(size >> SECTOR_SHIFT),
            logical_block: logical,
            physical_block: physical,
            files,
            serial,
            stats,
            metrics,
            config,
            repl: std::sync::OnceLock::new(),
            backend_channel: std::sync::Mutex::new(None),
            driver: std::sync::Mutex::new(None),
            driver_generation: std::sync::atomic::AtomicU64::new(0),
            paused: AtomicBool::new(false),
        })
    }

    pub fn geometry(&self) -> Geometry {
        Geometry {
            capacity_sectors: self.capacity_sectors(),
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
            capacity_sectors: self.capacity_sectors(),
            seg_max: virtio_blk::seg_max(self.config.queue_size),
            blk_size: self.logical_block,
            physical_block_exp: ratio.trailing_zeros() as u8,
            num_queues: self.config.queues,
            writeback: self.writeback(),
        }
    }

    pub fn driver(&self) -> Option<std::sync::Arc<crate::driver::Driver>> {
        self.driver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Installs (or replaces) the driver image; returns the previous one. Call before the
    /// disk serves, or with its queues drained and paused.
    pub fn set_driver(
        &self,
        d: Option<std::sync::Arc<crate::driver::Driver>>,
    ) -> Option<std::sync::Arc<crate::driver::Driver>> {
        let old = std::mem::replace(
            &mut *self.driver.lock().unwrap_or_else(|p| p.into_inner()),
            d,
        );
        self.driver_generation.fetch_add(1, Ordering::AcqRel);
        old
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors.load(Ordering::Acquire)
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_sectors() << SECTOR_SHIFT
    }

    /// Grows the disk to `bytes` (a multiple of 512): extends the file, then publishes the
    /// new capacity to the workers and tells the frontend (a config-change message), which
    /// re-reads the config space and notifies the guest. Shrinking is refused: a guest may
    /// have data there.
    pub fn resize(&self, bytes: u64) -> Result<(), String> {
        let cur = self.capacity_bytes();
        if bytes % SECTOR_SIZE != 0 {
            return Err(format!("{bytes} is not a multiple of 512"));
        }
        if bytes < cur {
            return Err(format!(
                "shrinking from {cur} to {bytes} bytes is refused (the guest may have data there)"
            ));
        }
        if self.config.volume.is_some() {
            return Err("resizing a replicated volume is not supported yet".into());
        }
        match &self.files {
            Some(f) if f.is_block_device => {
                return Err("a block device has the size of the device".into())
            }
            Some(f) => f
                .main
                .set_len(bytes)
                .and_then(|()| f.main.sync_all())
                .map_err(|e| format!("cannot extend the backing file: {e}"))?,
            None => {}
        }
        self.capacity_sectors
            .store(bytes >> SECTOR_SHIFT, Ordering::Release);
        self.notify_config_change();
        Ok(())
    }

    /// Sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG to the connected frontend, if it gave us a
    /// backend-request channel. Returns whether a message was sent.
    pub fn notify_config_change(&self) -> bool {
        use std::io::Write;
        const CONFIG_CHANGE_MSG: u32 = 2;
        const FLAG_VERSION: u32 = 0x1;
        let mut header = [0u8; 12];
        header[0..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
        header[4..8].copy_from_slice(&FLAG_VERSION.to_le_bytes());
        let mut ch = self
            .backend_channel
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match ch.as_mut().map(|s| s.write_all(&header)) {
            Some(Ok(())) => true,
            Some(Err(e)) => {
                tracing::warn!(disk = %self.config.socket.display(), "cannot send the config change: {e}");
                *ch = None;
                false
            }
            None => false,
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
