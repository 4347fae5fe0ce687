//! IEEE arithmetic and conversions with PTX rounding modes.
