//! Checker reports: what compute-sanitizer's memcheck, racecheck, initcheck and synccheck would
//! say, as one message that names the kernel, block, thread, PTX instruction, CUDA source line,
//! address and nearest allocation, with the CUDA error a real driver would return.

use crate::SimError;

/// A report under construction.
pub struct Report {
    code: u32,
    title: String,
    lines: Vec<String>,
}

impl Report {
    pub fn new(code: u32, title: impl Into<String>) -> Self {
        Report { code, title: title.into(), lines: Vec::new() }
    }

    pub fn detail(mut self, s: impl Into<String>) -> Self {
        self.lines.push(s.into());
        self
    }

    pub(crate) fn kernel(self, l: &crate::exec::Launch<'_>) -> Self {
        let (g, b) = (l.cfg.grid, l.cfg.block);
        let name = l.k.name.clone();
        self.detail(format!("kernel {name}, grid ({},{},{}), block ({},{},{})", g[0], g[1], g[2], b[0], b[1], b[2]))
    }

    pub fn finish(self) -> SimError {
        let mut s = format!("lowbit-sim: {}", self.title);
        for l in self.lines {
            s.push_str("\n    ");
            s.push_str(&l);
        }
        SimError::new(self.code, s)
    }
}
