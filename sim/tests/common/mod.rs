//! A small harness for the simulator's own tests: device memory, parameter buffers laid out per
//! the kernel's `.param` offsets, one-call launches, and an elementwise kernel template. Every
//! test PTX program is hand-written from the PTX ISA text (sections cited in the tests), never
//! taken from lowbit's kernels.

#![allow(dead_code)]

use lowbit_sim::{launch, GlobalMemory, LaunchConfig, LaunchStats, Module, SimConfig, SimError};

/// The module header every test program starts with (nvcc's style).
pub const HEADER: &str = ".version 9.0\n.target sm_80\n.address_size 64\n\n";

/// A kernel argument; its bytes go to the offset of the matching `.param`.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Ptr(u64),
    U32(u32),
    U64(u64),
    F32(f32),
}

impl Arg {
    fn bytes(self) -> Vec<u8> {
        match self {
            Arg::Ptr(v) | Arg::U64(v) => v.to_le_bytes().to_vec(),
            Arg::U32(v) => v.to_le_bytes().to_vec(),
            Arg::F32(v) => v.to_le_bytes().to_vec(),
        }
    }
}

/// Plain element types that travel to and from device memory little-endian.
pub trait Elem: Copy {
    const SIZE: usize;
    fn put(self, out: &mut Vec<u8>);
    fn get(b: &[u8]) -> Self;
}

macro_rules! elem {
    ($($t:ty),*) => {$(
        impl Elem for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn put(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn get(b: &[u8]) -> Self {
                <$t>::from_le_bytes(b.try_into().unwrap())
            }
        }
    )*};
}
elem!(u8, u16, u32, u64, i32, i64, f32, f64);

/// Device memory and the simulator configuration of one test.
pub struct Dev {
    pub mem: GlobalMemory,
    pub sim: SimConfig,
}

static PROFILE_FILES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Default for Dev {
    fn default() -> Self {
        Self::new()
    }
}

impl Dev {
    pub fn new() -> Dev {
        Dev { mem: GlobalMemory::new(), sim: SimConfig::default() }
    }

    /// A device whose launches count profile counters (the JSON lines go to a scratch file).
    pub fn profiled() -> Dev {
        let mut d = Dev::new();
        let n = PROFILE_FILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        d.sim.profile =
            Some(std::env::temp_dir().join(format!("lowbit-sim-test-profile-{}-{n}.jsonl", std::process::id())));
        d
    }

    /// A fresh allocation (poisoned, uninitialised).
    pub fn alloc(&self, bytes: usize) -> u64 {
        self.mem.alloc(bytes).unwrap()
    }

    /// An allocation of `bytes` zero bytes (initialised).
    pub fn zeros(&self, bytes: usize) -> u64 {
        let p = self.alloc(bytes);
        self.mem.memset(p, 0, bytes).unwrap();
        p
    }

    /// An allocation holding `data`.
    pub fn upload<T: Elem>(&self, data: &[T]) -> u64 {
        let mut b = Vec::with_capacity(data.len() * T::SIZE);
        for &x in data {
            x.put(&mut b);
        }
        let p = self.alloc(b.len().max(1));
        self.mem.copy_in(p, &b).unwrap();
        p
    }

    /// `n` elements at `ptr`.
    pub fn read<T: Elem>(&self, ptr: u64, n: usize) -> Vec<T> {
        let mut b = vec![0u8; n * T::SIZE];
        self.mem.copy_out(ptr, &mut b).unwrap();
        b.chunks_exact(T::SIZE).map(T::get).collect()
    }

    /// Parses `ptx` (the [`HEADER`] is prepended) and launches kernel `name`.
    pub fn launch(
        &self,
        ptx: &str,
        name: &str,
        grid: [u32; 3],
        block: [u32; 3],
        dynamic_smem: u32,
        args: &[Arg],
    ) -> Result<LaunchStats, SimError> {
        let module = Module::from_ptx(&format!("{HEADER}{ptx}")).unwrap_or_else(|e| panic!("PTX does not load: {e}"));
        let k = module.kernel(name).unwrap_or_else(|| panic!("no kernel {name}"));
        assert_eq!(k.params.len(), args.len(), "kernel {name} takes {} parameters", k.params.len());
        let mut buf = vec![0u8; k.param_bytes];
        for (p, a) in k.params.iter().zip(args) {
            let b = a.bytes();
            assert_eq!(b.len(), p.size, "parameter at offset {} of {name}", p.offset);
            buf[p.offset..p.offset + p.size].copy_from_slice(&b);
        }
        let cfg = LaunchConfig { grid, block, dynamic_smem };
        launch(k, &cfg, &buf, &self.mem, &self.sim)
    }

    /// Like [`Dev::launch`] with a 1-D grid, panicking on an error.
    pub fn run(&self, ptx: &str, name: &str, grid: u32, block: u32, args: &[Arg]) -> LaunchStats {
        self.launch(ptx, name, [grid, 1, 1], [block, 1, 1], 0, args)
            .unwrap_or_else(|e| panic!("launch of {name} failed: {e}"))
    }
}

/// Register declarations shared by the templates.
pub const REGS: &str = "\t.reg .pred %p<16>;\n\t.reg .b16 %rs<16>;\n\t.reg .b32 %r<64>;\n\t.reg .f32 %f<32>;\n\t.reg .b64 %rd<64>;\n\t.reg .f64 %fd<16>;\n";

/// An elementwise kernel over 32-bit words: thread i loads `%r1 = a[i]`, `%r2 = b[i]`,
/// `%r3 = c[i]`, runs `body`, and stores `%r4` to `out[i]`. Registers free for the body:
/// `%r4..%r19`, `%r30..%r63`, `%f*`, `%fd*`, `%rs*`, `%p0..%p6`, `%rd30..%rd63`.
pub fn ew32_ptx(body: &str) -> String {
    format!(
        r#".visible .entry ew(
	.param .u64 ew_param_0,
	.param .u64 ew_param_1,
	.param .u64 ew_param_2,
	.param .u64 ew_param_3,
	.param .u32 ew_param_4
)
{{
{REGS}
	ld.param.u64 %rd1, [ew_param_0];
	ld.param.u64 %rd2, [ew_param_1];
	ld.param.u64 %rd3, [ew_param_2];
	ld.param.u64 %rd4, [ew_param_3];
	ld.param.u32 %r20, [ew_param_4];
	mov.u32 %r21, %ctaid.x;
	mov.u32 %r22, %ntid.x;
	mov.u32 %r23, %tid.x;
	mad.lo.s32 %r24, %r21, %r22, %r23;
	setp.ge.u32 %p7, %r24, %r20;
	@%p7 bra $L__done;
	mul.wide.u32 %rd5, %r24, 4;
	add.s64 %rd6, %rd2, %rd5;
	ld.global.u32 %r1, [%rd6];
	add.s64 %rd7, %rd3, %rd5;
	ld.global.u32 %r2, [%rd7];
	add.s64 %rd8, %rd4, %rd5;
	ld.global.u32 %r3, [%rd8];
	mov.u32 %r4, 0;
{body}
	add.s64 %rd9, %rd1, %rd5;
	st.global.u32 [%rd9], %r4;
$L__done:
	ret;
}}
"#
    )
}

/// Runs [`ew32_ptx`]`(body)` over `a`, `b`, `c` (equal lengths) and returns `out`.
pub fn ew32(body: &str, a: &[u32], b: &[u32], c: &[u32]) -> Vec<u32> {
    let n = a.len();
    assert!(b.len() == n && c.len() == n);
    let d = Dev::new();
    let (pa, pb, pc, po) = (d.upload(a), d.upload(b), d.upload(c), d.zeros(4 * n));
    d.run(
        &ew32_ptx(body),
        "ew",
        n.div_ceil(256) as u32,
        256,
        &[Arg::Ptr(po), Arg::Ptr(pa), Arg::Ptr(pb), Arg::Ptr(pc), Arg::U32(n as u32)],
    );
    d.read(po, n)
}

/// The 64-bit twin of [`ew32`]: inputs `%rd11`, `%rd12`, `%rd13`, output `%rd14`.
pub fn ew64(body: &str, a: &[u64], b: &[u64], c: &[u64]) -> Vec<u64> {
    let n = a.len();
    assert!(b.len() == n && c.len() == n);
    let ptx = ew32_ptx(&format!(
        "\tmul.wide.u32 %rd25, %r24, 8;\n\tadd.s64 %rd26, %rd2, %rd25;\n\tld.global.u64 %rd11, [%rd26];\n\tadd.s64 %rd26, %rd3, %rd25;\n\tld.global.u64 %rd12, [%rd26];\n\tadd.s64 %rd26, %rd4, %rd25;\n\tld.global.u64 %rd13, [%rd26];\n\tmov.u64 %rd14, 0;\n{body}\n\tadd.s64 %rd26, %rd1, %rd25;\n\tst.global.u64 [%rd26], %rd14;\n"
    ))
    .replace("\tadd.s64 %rd9, %rd1, %rd5;\n\tst.global.u32 [%rd9], %r4;\n", "")
    .replace("ld.global.u32 %r1, [%rd6];", "")
    .replace("ld.global.u32 %r2, [%rd7];", "")
    .replace("ld.global.u32 %r3, [%rd8];", "");
    let d = Dev::new();
    let (pa, pb, pc, po) = (d.upload(a), d.upload(b), d.upload(c), d.zeros(8 * n));
    d.run(
        &ptx,
        "ew",
        n.div_ceil(256) as u32,
        256,
        &[Arg::Ptr(po), Arg::Ptr(pa), Arg::Ptr(pb), Arg::Ptr(pc), Arg::U32(n as u32)],
    );
    d.read(po, n)
}

/// A small deterministic generator (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn vec_u32(&mut self, n: usize) -> Vec<u32> {
        (0..n).map(|_| self.next_u32()).collect()
    }
    pub fn vec_u64(&mut self, n: usize) -> Vec<u64> {
        (0..n).map(|_| self.next_u64()).collect()
    }
}

/// Interesting 32-bit operands: edges of both signed and unsigned ranges plus random words.
pub fn edge_u32(rng: &mut Rng, extra: usize) -> Vec<u32> {
    let mut v = vec![
        0,
        1,
        2,
        3,
        7,
        31,
        32,
        33,
        63,
        64,
        0x7FFF_FFFF,
        0x8000_0000,
        0x8000_0001,
        0xFFFF_FFFF,
        0xFFFF_FFFE,
        0xFFFF,
        0x1_0000,
    ];
    v.extend((0..extra).map(|_| rng.next_u32()));
    v
}

/// All pairs of `xs` as two parallel vectors.
pub fn pairs(xs: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let mut a = Vec::new();
    let mut b = Vec::new();
    for &x in xs {
        for &y in xs {
            a.push(x);
            b.push(y);
        }
    }
    (a, b)
}

/// IEEE binary16 → f64 (exact).
pub fn f16_val(h: u16) -> f64 {
    let s = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let e = ((h >> 10) & 0x1F) as i32;
    let m = (h & 0x3FF) as f64;
    match e {
        0 => s * m * 2f64.powi(-24),
        31 if m == 0.0 => s * f64::INFINITY,
        31 => f64::NAN,
        _ => s * (1.0 + m / 1024.0) * 2f64.powi(e - 15),
    }
}

/// The f16 bits of `x`, which must be exactly representable as a normal f16 or zero.
pub fn f16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let s = (bits >> 16) & 0x8000;
    if x == 0.0 {
        return s as u16;
    }
    let e = ((bits >> 23) & 0xFF) as i32 - 127 + 15;
    assert!((1..31).contains(&e) && bits & 0x1FFF == 0, "{x} is not an exact normal f16");
    (s | (e as u32) << 10 | ((bits >> 13) & 0x3FF)) as u16
}

/// The bf16 bits of `x`, which must be exactly representable.
pub fn bf16_bits(x: f32) -> u16 {
    assert!(x.to_bits() & 0xFFFF == 0, "{x} is not an exact bf16");
    (x.to_bits() >> 16) as u16
}
