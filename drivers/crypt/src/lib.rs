//! crypt image (being written).
