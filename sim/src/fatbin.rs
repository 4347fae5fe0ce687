//! The fatbin container.
