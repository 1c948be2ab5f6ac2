//! Tests of the crypt image: a published XTS-AES-256 vector, then the whole data path
//! through the exported C functions, as the host calls them.

use super::*;
use ferrodisk_driver_sdk::serde_json::json;
use ferrodisk_driver_sdk::testing::{split_at, Attached, TestHost};
use ferrodisk_driver_sdk::{exported_image, DriverInfo, FAIL, PASS};

/// IEEE P1619/D16 (IEEE 1619-2007) Annex B, XTS-AES-256 vector 10: Key1 = digits of e,
/// Key2 = digits of pi, data unit sequence number 0xff, one 512-byte data unit of bytes
/// 00..ff twice.
const V10_KEY: &str = concat!(
    "2718281828459045235360287471352662497757247093699959574966967627",
    "3141592653589793238462643383279502884197169399375105820974944592",
);
const V10_SECTOR: u64 = 0xff;
const V10_CTX: [&str; 16] = [
    "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b",
    "5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd",
    "5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0",
    "c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca",
    "2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0",
    "b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f",
    "93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec",
    "583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a",
    "84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1",
    "505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae",
    "9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29",
    "a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac",
    "6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f",
    "645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385",
    "1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa",
    "773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151",
];

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn v10_plaintext() -> [u8; SECTOR_SIZE] {
    std::array::from_fn(|i| i as u8)
}

fn key_of(seed: u8) -> String {
    (0..KEY_BYTES)
        .map(|i| {
            format!(
                "{:02x}",
                seed.wrapping_mul(31)
                    .wrapping_add((i as u8).wrapping_mul(7))
            )
        })
        .collect()
}

fn attach(key: &str) -> Attached {
    let host = TestHost::new(&json!({}), &json!({"image": null, "attach": {"key": key}}));
    exported_image!().attach(&host).expect("attach")
}

fn attach_error(attach: ferrodisk_driver_sdk::serde_json::Value) -> String {
    let host = TestHost::new(&json!({}), &json!({"image": null, "attach": attach}));
    exported_image!().attach(&host).unwrap_err()
}

/// Plaintext that differs in every sector.
fn plaintext(sectors: usize) -> Vec<u8> {
    (0..sectors * SECTOR_SIZE)
        .map(|i| (i / 3 + i / SECTOR_SIZE * 101) as u8)
        .collect()
}

/// Writes `data` at `offset` through `submit`, the guest buffers split at `cuts`; returns what
/// the host would store (the bounce buffer), checking the guest's buffers were not touched.
fn write(attached: &Attached, offset: u64, data: &[u8], cuts: &[usize]) -> Vec<u8> {
    let pieces = split_at(data, cuts);
    let slices: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
    let mut bounce = vec![0u8; data.len()];
    assert_eq!(
        attached.submit(Op::Write, 0, offset, &slices, Some(&mut bounce)),
        (PASS, 0)
    );
    assert_eq!(pieces.concat(), data, "the guest's buffers are left alone");
    bounce
}

/// Reads `stored` at `offset` through `complete`, into guest buffers split at `cuts`.
fn read(attached: &Attached, offset: u64, stored: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut pieces = split_at(stored, cuts);
    let mut slices: Vec<&mut [u8]> = pieces.iter_mut().map(Vec::as_mut_slice).collect();
    assert_eq!(
        attached.submit_range(Op::Read, 1, offset, stored.len() as u64),
        (PASS, 0)
    );
    assert_eq!(attached.complete_read(1, offset, &mut slices, 0), 0);
    pieces.concat()
}

#[test]
fn ieee_1619_vector_10() {
    let key: [u8; KEY_BYTES] = hex(V10_KEY).try_into().unwrap();
    let crypt = Crypt::new(&key).unwrap();
    let ctx = hex(&V10_CTX.concat());
    let mut sector = v10_plaintext();
    crypt.encrypt_sector(V10_SECTOR, &mut sector);
    assert_eq!(sector.as_slice(), ctx.as_slice());
    crypt.decrypt_sector(V10_SECTOR, &mut sector);
    assert_eq!(sector, v10_plaintext());
}

#[test]
fn ieee_1619_vector_10_through_the_abi() {
    // Sector 0xff is byte offset 0xff * 512: the tweak is the sector number, little-endian.
    let attached = attach(V10_KEY);
    let offset = V10_SECTOR * SECTOR_SIZE as u64;
    let stored = write(&attached, offset, &v10_plaintext(), &[1, 17, 256, 511]);
    assert_eq!(stored, hex(&V10_CTX.concat()));
    assert_eq!(
        read(&attached, offset, &stored, &[100, 300]),
        v10_plaintext()
    );
}

#[test]
fn info() {
    let (info, name, version): (DriverInfo, _, _) = exported_image!().info();
    assert_eq!((name.as_str(), version.as_str()), ("crypt", "1.0.0"));
    assert_eq!(info.flags, WANTS_WRITE_DATA | WANTS_READ_DATA);
}

#[test]
fn round_trip_across_odd_iovec_boundaries() {
    let attached = attach(&key_of(1));
    let data = plaintext(8);
    let offset = 1000 * SECTOR_SIZE as u64;
    let stored = write(
        &attached,
        offset,
        &data,
        &[1, 511, 513, 1000, 1000, 2047, 2049, 4095],
    );
    assert_ne!(stored, data);
    for (c, p) in stored.chunks(SECTOR_SIZE).zip(data.chunks(SECTOR_SIZE)) {
        assert_ne!(c, p, "every sector is encrypted");
    }
    for cuts in [
        &[][..],
        &[3, 700, 1500, 1500, 3000],
        &[511, 512, 513, 1024, 1025, 4000],
    ] {
        assert_eq!(
            read(&attached, offset, &stored, cuts),
            data,
            "cuts {cuts:?}"
        );
    }
    let every_byte: Vec<usize> = (1..1024).collect();
    let short = write(&attached, 0, &data[..1024], &every_byte);
    assert_eq!(read(&attached, 0, &short, &every_byte), &data[..1024]);
}

#[test]
fn the_tweak_is_the_sector_number() {
    let attached = attach(&key_of(2));
    let same = vec![0x5Au8; 2 * SECTOR_SIZE];
    let at0 = write(&attached, 0, &same, &[]);
    let at7 = write(&attached, 7 * SECTOR_SIZE as u64, &same, &[]);
    assert_ne!(
        at0[..SECTOR_SIZE],
        at0[SECTOR_SIZE..],
        "neighbouring sectors differ"
    );
    assert_ne!(at0, at7, "the same data stores differently elsewhere");
    // Stored sector 1 of the first write is sector 1 on the disk, whichever request wrote it.
    assert_eq!(
        write(&attached, SECTOR_SIZE as u64, &same[..SECTOR_SIZE], &[]),
        at0[SECTOR_SIZE..]
    );
    // Read at the wrong offset: noise.
    assert_ne!(read(&attached, 7 * SECTOR_SIZE as u64, &at0, &[]), same);
}

#[test]
fn zero_sectors_read_as_zeros() {
    let attached = attach(&key_of(3));
    let data = plaintext(4);
    let mut stored = write(&attached, 0, &data, &[]);
    // Write-zeroes / discard left sector 2 zeroed on the backing.
    assert_eq!(
        attached.submit_range(Op::WriteZeroes, 0, 2 * SECTOR_SIZE as u64, 512),
        (PASS, 0)
    );
    stored[2 * SECTOR_SIZE..3 * SECTOR_SIZE].fill(0);
    let got = read(&attached, 0, &stored, &[700, 1300]);
    assert_eq!(got[..2 * SECTOR_SIZE], data[..2 * SECTOR_SIZE]);
    assert!(got[2 * SECTOR_SIZE..3 * SECTOR_SIZE]
        .iter()
        .all(|&b| b == 0));
    assert_eq!(got[3 * SECTOR_SIZE..], data[3 * SECTOR_SIZE..]);
    // A guest writing zeros stores ciphertext, and reads zeros back.
    let zeros = vec![0u8; SECTOR_SIZE];
    let stored = write(&attached, 0, &zeros, &[]);
    assert!(stored.iter().any(|&b| b != 0));
    assert_eq!(read(&attached, 0, &stored, &[]), zeros);
}

#[test]
fn a_wrong_key_reads_garbage() {
    let data = plaintext(4);
    let stored = write(&attach(&key_of(4)), 4096, &data, &[]);
    let got = read(&attach(&key_of(5)), 4096, &stored, &[]);
    for (g, p) in got.chunks(SECTOR_SIZE).zip(data.chunks(SECTOR_SIZE)) {
        assert_ne!(g, p);
    }
}

#[test]
fn unaligned_requests_fail() {
    let attached = attach(&key_of(6));
    let data = vec![1u8; 1024];
    let mut bounce = vec![0u8; 1024];
    assert_eq!(
        attached
            .submit(Op::Write, 0, 100, &[&data], Some(&mut bounce))
            .0,
        FAIL
    );
    assert_eq!(
        attached
            .submit(Op::Write, 0, 0, &[&data[..1000]], Some(&mut bounce[..1000]))
            .0,
        FAIL
    );
    assert_eq!(
        bounce,
        vec![0u8; 1024],
        "nothing was written to the bounce buffer"
    );
    assert_eq!(attached.submit_range(Op::Read, 0, 512, 100).0, FAIL);
    assert_eq!(attached.submit_range(Op::Discard, 0, 1, 512).0, FAIL);
    assert_eq!(attached.submit_range(Op::WriteZeroes, 0, 512, 513).0, FAIL);
    assert_eq!(attached.submit_range(Op::Unknown(9), 0, 0, 512).0, FAIL);
    assert_eq!(attached.submit_range(Op::Flush, 0, 0, 0).0, PASS);
    // complete() on an unaligned read (the host should never send one): internal error.
    let mut buf = vec![0u8; 100];
    assert!(attached.complete_read(0, 0, &mut [&mut buf], 0) < 0);
    // A failed read is left alone.
    let mut buf = vec![7u8; 512];
    assert_eq!(attached.complete_read(0, 0, &mut [&mut buf], 5), 0);
    assert_eq!(buf, vec![7u8; 512]);
}

#[test]
fn bad_keys_are_refused_without_quoting_them() {
    let secret = key_of(7);
    let cases = [
        (json!(null), "crypt: attach.key is missing"),
        (json!({}), "crypt: attach.key is missing"),
        (json!("k"), "crypt: attach must be an object"),
        (
            json!({"key": 5}),
            "crypt: attach.key must be a string of 128 hex digits",
        ),
        (
            json!({"key": &secret[..126]}),
            "must be 128 hex digits (64 bytes), got 126 characters",
        ),
        (
            json!({"key": format!("{}zz", &secret[..126])}),
            "not hexadecimal (character 127)",
        ),
        (
            json!({"key": format!("{}{}", &secret[..64], &secret[..64])}),
            "identical halves",
        ),
        (
            json!({"key": &secret, "cipher": "aes"}),
            "unknown key attach.cipher",
        ),
    ];
    for (config, want) in cases {
        let got = attach_error(config.clone());
        assert!(got.contains(want), "{config}: got {got:?}, want {want:?}");
        assert!(!got.contains(&secret[..16]), "the key leaked into {got:?}");
    }
    // Upper-case hex is a key too.
    attach(&secret.to_uppercase());
}
