//! Checker reports.
