//! Architecture support. Kite runs x86_64 guests on x86_64 hosts.

pub mod x86_64;
