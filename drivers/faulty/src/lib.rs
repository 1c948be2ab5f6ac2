//! faulty image (being written).
