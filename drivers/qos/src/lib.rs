//! qos image (being written).
