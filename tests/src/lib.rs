//! Integration tests that boot real guests: filled by issue 3 (see README).
