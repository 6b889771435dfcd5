//! PLACEHOLDER until the converter branch lands: block structs only.
pub mod q4_0;
pub mod q8_0;
pub use q4_0::BlockQ4_0;
pub use q8_0::BlockQ8_0;
