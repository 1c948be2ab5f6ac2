//! The inflight messages through the relay, driven by the vhost crate's own frontend: the
//! feature is offered, GET_INFLIGHT_FD returns a usable region, SET_INFLIGHT_FD takes it
//! back, a mismatched region is refused, and the disk keeps serving afterwards.

mod common;

use std::os::fd::AsRawFd;

use common::*;
use tempfile::TempDir;
use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;

fn negotiated(sock: &std::path::Path) -> (Frontend, VhostUserProtocolFeatures) {
    let mut f = Frontend::connect(sock, 2).expect("connect");
    f.set_owner().unwrap();
    let features = f.get_features().unwrap();
    assert_ne!(features & (1 << 30), 0, "VHOST_USER_F_PROTOCOL_FEATURES");
    f.set_features(features).unwrap();
    let proto = f.get_protocol_features().unwrap();
    f.set_protocol_features(proto).unwrap();
    (f, proto)
}

#[test]
fn inflight_region_round_trip() {
    let dir = TempDir::new().unwrap();
    let img = dir.path().join("d.img");
    make_image(&img, 8 << 20);
    let sock = dir.path().join("d.sock");
    let _d = Daemon::start(
        &[format!(
            "path={},socket={},queues=2",
            img.display(),
            sock.display()
        )],
        &sock,
    );
    {
        let (mut f, proto) = negotiated(&sock);
        assert!(
            proto.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
            "{proto:?}"
        );
        assert!(proto.contains(VhostUserProtocolFeatures::REPLY_ACK));
        let ask = VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 2,
            queue_size: 128,
        };
        let (info, file) = f.get_inflight_fd(&ask).expect("GET_INFLIGHT_FD");
        let per_queue = ferrodisk::inflight::queue_region_size(128) as u64;
        assert_eq!((info.num_queues, info.queue_size), (2, 128));
        assert_eq!(info.mmap_size, 2 * per_queue);
        assert_eq!(file.metadata().unwrap().len(), info.mmap_size);
        // Each queue's header says version 1 and 128 descriptors.
        let bytes = std::fs::read(format!("/proc/self/fd/{}", file.as_raw_fd())).unwrap();
        for q in 0..2 {
            let h = &bytes[(q * per_queue) as usize..];
            assert_eq!(u16::from_le_bytes([h[8], h[9]]), 1, "version of queue {q}");
            assert_eq!(
                u16::from_le_bytes([h[10], h[11]]),
                128,
                "desc_num of queue {q}"
            );
        }
        // Ask for REPLY_ACK acknowledgements, so SET_INFLIGHT_FD reports failure.
        f.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        f.set_inflight_fd(&info, file.as_raw_fd())
            .expect("SET_INFLIGHT_FD");
        // The same region described with another queue size does not match its headers.
        let wrong = VhostUserInflight {
            queue_size: 64,
            ..info
        };
        assert!(
            f.set_inflight_fd(&wrong, file.as_raw_fd()).is_err(),
            "a mismatched region is refused"
        );
        // Bigger than what the memfd holds is refused too.
        let big = VhostUserInflight {
            mmap_size: 1,
            ..info
        };
        assert!(f.set_inflight_fd(&big, file.as_raw_fd()).is_err());
    }
    // The disk still serves a normal frontend afterwards.
    let mut c = Client::connect(&sock, 2, false).unwrap();
    assert_eq!(c.write(1, 4096, &[9u8; 4096], blkio::ReqFlags::empty()), 0);
    assert_eq!(c.read(0, 4096, 4096).unwrap(), vec![9u8; 4096]);
}

#[test]
fn inflight_off_is_not_offered() {
    let dir = TempDir::new().unwrap();
    let sock = dir.path().join("n.sock");
    let _d = Daemon::start(
        &[format!(
            "engine=null,size=1M,socket={},inflight=off",
            sock.display()
        )],
        &sock,
    );
    let (_f, proto) = negotiated(&sock);
    assert!(
        !proto.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
        "{proto:?}"
    );
}
