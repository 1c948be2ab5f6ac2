//! The driver image ABI, version 1 (`docs/driver-abi.md` is the reference).
//!
//! The host uses the very definitions images are built against, from the SDK crate
//! (`drivers/sdk`), whose tests pin every size, alignment and field offset: there is one
//! copy of the `#[repr(C)]` types, so the two sides cannot drift apart.

pub use ferrodisk_driver_sdk::abi::*;
