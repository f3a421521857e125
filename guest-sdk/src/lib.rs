#![doc = include_str!("../README.md")]
// `chunks_exact(4)` makes every index below in range, and a panic in a guest ends only its own job.
#![allow(clippy::indexing_slicing)]

pub mod checkpoint;
pub mod collective;
pub mod raw;
mod sys;
pub mod tensor;

/// A folder of files as one init input (`wasmgrid infer --init DIR`): [`files::parse`] reads it.
pub use abi::files;

use std::fmt;

pub use abi::{ABI_VERSION, ErrorCode};

/// What went wrong in a call to the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// The host refused the call; `message` says why (for invalid WGSL, the compiler's message).
    Host { code: ErrorCode, message: String },
    /// The job input (or a request) is not what this kernel expects.
    BadInput(String),
    /// A failure of the kernel's own logic.
    Kernel(String),
}

impl Error {
    /// An error for a request or input this kernel cannot use.
    pub fn bad_input(message: impl Into<String>) -> Error {
        Error::BadInput(message.into())
    }

    /// An error of the kernel's own.
    pub fn kernel(message: impl Into<String>) -> Error {
        Error::Kernel(message.into())
    }

    /// The host error code, when the host refused the call.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Host { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Host { code, message } if message.is_empty() => f.write_str(code.name()),
            Error::Host { code, message } => write!(f, "{}: {message}", code.name()),
            Error::BadInput(m) => write!(f, "bad input: {m}"),
            Error::Kernel(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

/// The result of every SDK call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Turns a host result into a `Result`, fetching the host's message for an error.
fn check(ret: i32) -> Result<u32> {
    if ret >= 0 {
        return Ok(ret as u32);
    }
    let code = ErrorCode::from_i32(ret).unwrap_or(ErrorCode::InvalidArgument);
    Err(Error::Host { code, message: last_error_message() })
}

fn last_error_message() -> String {
    let mut buf = vec![0u8; 1024];
    let n = sys::last_error(sys::addr(buf.as_mut_ptr()), sys::len(buf.len()));
    let Ok(n) = usize::try_from(n) else { return String::new() };
    if n > buf.len() {
        buf.resize(n, 0);
        let again = sys::last_error(sys::addr(buf.as_mut_ptr()), sys::len(buf.len()));
        if again < 0 {
            return String::new();
        }
    }
    buf.truncate(n);
    String::from_utf8_lossy(&buf).into_owned()
}

/// The job input; in an inference call, the request.
pub fn input() -> Result<Vec<u8>> {
    let total = sys::input_len();
    let total = usize::try_from(total)
        .map_err(|_| Error::Host { code: ErrorCode::InvalidArgument, message: last_error_message() })?;
    // A closure: on wasm32 the import is an `extern "C"` fn, which is not `Fn`.
    #[allow(clippy::redundant_closure)]
    read_all(total, |d, l, o| sys::input_read(d, l, o))
}

/// Reads `total` bytes through a host function shaped like `input_read` (`dst, len, offset`),
/// fewer if it ends early.
fn read_all(total: usize, read: impl Fn(i32, i32, i64) -> i32) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; total];
    let mut done = 0usize;
    while done < total {
        let rest = &mut buf[done..];
        let n = check(read(sys::addr(rest.as_mut_ptr()), sys::len(rest.len()), done as i64))?;
        if n == 0 {
            break;
        }
        done += n as usize;
    }
    buf.truncate(done);
    Ok(buf)
}

/// The job input read as little-endian `f32`s.
pub fn input_f32() -> Result<Vec<f32>> {
    let bytes = input()?;
    if bytes.len() % 4 != 0 {
        return Err(Error::bad_input(format!("{} bytes is not a whole number of f32s", bytes.len())));
    }
    Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// Appends bytes to the job output.
pub fn output(bytes: &[u8]) -> Result<()> {
    check(sys::output_write(sys::addr(bytes.as_ptr()), sys::len(bytes.len()))).map(drop)
}

/// Appends `f32`s to the job output, little-endian.
pub fn output_f32(values: &[f32]) -> Result<()> {
    output(&f32_bytes(values))
}

/// How loud a log line is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
}

/// Writes one line to the job log.
pub fn log(level: Level, message: &str) {
    let level = match level {
        Level::Error => abi::LOG_ERROR,
        Level::Warn => abi::LOG_WARN,
        Level::Info => abi::LOG_INFO,
        Level::Debug => abi::LOG_DEBUG,
    };
    // A log line the host refuses (the log is full) is not worth failing the job over.
    let _ = sys::log(level, sys::addr(message.as_ptr()), sys::len(message.len()));
}

/// Element types that move between guest memory and GPU buffers as little-endian bytes.
pub trait Scalar: Copy {
    fn to_le(self) -> [u8; 4];
    fn from_le(bytes: [u8; 4]) -> Self;
}

impl Scalar for f32 {
    fn to_le(self) -> [u8; 4] {
        self.to_le_bytes()
    }
    fn from_le(bytes: [u8; 4]) -> Self {
        f32::from_le_bytes(bytes)
    }
}

impl Scalar for u32 {
    fn to_le(self) -> [u8; 4] {
        self.to_le_bytes()
    }
    fn from_le(bytes: [u8; 4]) -> Self {
        u32::from_le_bytes(bytes)
    }
}

impl Scalar for i32 {
    fn to_le(self) -> [u8; 4] {
        self.to_le_bytes()
    }
    fn from_le(bytes: [u8; 4]) -> Self {
        i32::from_le_bytes(bytes)
    }
}

/// Scalars as little-endian bytes, the layout WGSL buffers use.
pub fn to_bytes<T: Scalar>(values: &[T]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le()).collect()
}

/// Little-endian bytes as scalars; a trailing partial element is dropped.
pub fn from_bytes<T: Scalar>(bytes: &[u8]) -> Vec<T> {
    bytes.chunks_exact(4).map(|c| T::from_le([c[0], c[1], c[2], c[3]])).collect()
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    to_bytes(values)
}

/// What a buffer is bound as in WGSL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufferKind {
    /// `var<storage, read>` or `var<storage, read_write>`.
    Storage,
    /// `var<uniform>`.
    Uniform,
}

/// A buffer in GPU memory, zero-filled when created and freed when dropped. Sizes, offsets and
/// lengths of copies are multiples of 4 bytes.
#[derive(Debug)]
pub struct Buffer {
    handle: u32,
    size: u64,
    kind: BufferKind,
}

impl Buffer {
    /// A zero-filled buffer of `size` bytes.
    pub fn new(kind: BufferKind, size: u64) -> Result<Buffer> {
        let usage = match kind {
            BufferKind::Storage => abi::BUFFER_STORAGE,
            BufferKind::Uniform => abi::BUFFER_UNIFORM,
        };
        let size_arg = i64::try_from(size).map_err(|_| Error::Host {
            code: ErrorCode::InvalidArgument,
            message: format!("buffer size {size} is too large"),
        })?;
        let handle = check(sys::buffer_create(size_arg, usage))?;
        Ok(Buffer { handle, size, kind })
    }

    /// A zero-filled storage buffer of `size` bytes.
    pub fn storage(size: u64) -> Result<Buffer> {
        Buffer::new(BufferKind::Storage, size)
    }

    /// A zero-filled uniform buffer of `size` bytes.
    pub fn uniform(size: u64) -> Result<Buffer> {
        Buffer::new(BufferKind::Uniform, size)
    }

    /// A storage buffer holding `values`.
    pub fn storage_from<T: Scalar>(values: &[T]) -> Result<Buffer> {
        Buffer::from_bytes(BufferKind::Storage, &to_bytes(values))
    }

    /// A uniform buffer holding `values` (for example a struct of `u32` sizes).
    pub fn uniform_from<T: Scalar>(values: &[T]) -> Result<Buffer> {
        Buffer::from_bytes(BufferKind::Uniform, &to_bytes(values))
    }

    /// A buffer holding `bytes`.
    pub fn from_bytes(kind: BufferKind, bytes: &[u8]) -> Result<Buffer> {
        let buffer = Buffer::new(kind, bytes.len() as u64)?;
        buffer.write_bytes(0, bytes)?;
        Ok(buffer)
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Storage or uniform.
    pub fn kind(&self) -> BufferKind {
        self.kind
    }

    /// The host's handle, for code that calls the raw ABI.
    pub fn handle(&self) -> u32 {
        self.handle
    }

    /// Copies `bytes` into the buffer at byte `offset`.
    pub fn write_bytes(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        let ret =
            sys::buffer_write(self.handle as i32, offset as i64, sys::addr(bytes.as_ptr()), sys::len(bytes.len()));
        check(ret).map(drop)
    }

    /// Copies `values` into the buffer at byte `offset`.
    pub fn write<T: Scalar>(&self, offset: u64, values: &[T]) -> Result<()> {
        self.write_bytes(offset, &to_bytes(values))
    }

    /// Copies `len` bytes from byte `offset` of the buffer.
    pub fn read_bytes(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut out = vec![0u8; len];
        let ret = sys::buffer_read(self.handle as i32, offset as i64, sys::addr(out.as_mut_ptr()), sys::len(out.len()));
        check(ret)?;
        Ok(out)
    }

    /// The whole buffer as scalars.
    pub fn read<T: Scalar>(&self) -> Result<Vec<T>> {
        let len = usize::try_from(self.size)
            .map_err(|_| Error::kernel(format!("buffer of {} bytes does not fit in memory", self.size)))?;
        Ok(from_bytes(&self.read_bytes(0, len)?))
    }

    /// The whole buffer as `f32`s.
    pub fn read_f32(&self) -> Result<Vec<f32>> {
        self.read()
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // Destroying a handle this value owns cannot fail; if the host disagrees there is
        // nothing useful to do about it in a destructor.
        let _ = sys::buffer_destroy(self.handle as i32);
    }
}

/// A WGSL compute shader entry point, ready to dispatch. Freed when dropped.
#[derive(Debug)]
pub struct Pipeline {
    handle: u32,
}

impl Pipeline {
    /// Compiles `wgsl` for the entry point `entry`. Invalid WGSL comes back as
    /// [`ErrorCode::InvalidWgsl`] with the compiler's message.
    pub fn new(wgsl: &str, entry: &str) -> Result<Pipeline> {
        let ret = sys::pipeline_create(
            sys::addr(wgsl.as_ptr()),
            sys::len(wgsl.len()),
            sys::addr(entry.as_ptr()),
            sys::len(entry.len()),
        );
        Ok(Pipeline { handle: check(ret)? })
    }

    /// The host's handle, for code that calls the raw ABI.
    pub fn handle(&self) -> u32 {
        self.handle
    }

    /// Runs one dispatch of `workgroups` (x, y, z) with `bindings` (binding number, buffer) and
    /// waits for the GPU to finish.
    pub fn dispatch(&self, bindings: &[(u32, &Buffer)], workgroups: [u32; 3]) -> Result<()> {
        let mut s = Submission::new();
        s.dispatch(self, bindings, workgroups);
        s.run()
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        let _ = sys::pipeline_destroy(self.handle as i32);
    }
}

/// Several dispatches that run in order in one GPU submission. Each dispatch sees the writes of
/// the ones before it.
#[derive(Debug, Default)]
pub struct Submission {
    dispatches: Vec<(u32, Vec<abi::BindingDesc>, [u32; 3])>,
}

impl Submission {
    pub fn new() -> Submission {
        Submission::default()
    }

    /// Adds a dispatch of `pipeline` over `workgroups` with `bindings`.
    pub fn dispatch(&mut self, pipeline: &Pipeline, bindings: &[(u32, &Buffer)], workgroups: [u32; 3]) -> &mut Self {
        self.dispatch_handle(pipeline.handle, bindings, workgroups);
        self
    }

    /// As [`dispatch`](Submission::dispatch), by pipeline handle: the caller keeps the
    /// pipeline and the buffers alive until the submission has run.
    pub(crate) fn dispatch_handle(&mut self, pipeline: u32, bindings: &[(u32, &Buffer)], workgroups: [u32; 3]) {
        let bindings = bindings
            .iter()
            .map(|(binding, buffer)| abi::BindingDesc { binding: *binding, buffer: buffer.handle })
            .collect();
        self.dispatches.push((pipeline, bindings, workgroups));
    }

    /// Number of dispatches added so far.
    pub fn len(&self) -> usize {
        self.dispatches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dispatches.is_empty()
    }

    /// Submits every dispatch and waits for the GPU to finish them.
    pub fn run(&self) -> Result<()> {
        let encoded: Vec<Vec<u8>> = self
            .dispatches
            .iter()
            .map(|(_, bindings, _)| bindings.iter().flat_map(|b| b.to_bytes()).collect())
            .collect();
        let mut descs = Vec::with_capacity(self.dispatches.len() * abi::DispatchDesc::SIZE);
        for ((pipeline, bindings, [x, y, z]), bytes) in self.dispatches.iter().zip(&encoded) {
            let desc = abi::DispatchDesc {
                pipeline: *pipeline,
                bindings_ptr: sys::addr(bytes.as_ptr()) as u32,
                bindings_len: bindings.len() as u32,
                x: *x,
                y: *y,
                z: *z,
            };
            descs.extend_from_slice(&desc.to_bytes());
        }
        check(sys::submit(sys::addr(descs.as_ptr()), sys::len(self.dispatches.len()))).map(drop)
    }
}

/// A kernel that serves requests: [`init`](InferenceService::init) once, then
/// [`infer`](InferenceService::infer) once per request. Export it with [`inference_service!`].
pub trait InferenceService: Sized {
    /// Runs once with the job input, before any request: load weights onto the GPU here.
    fn init(input: &[u8]) -> Result<Self>;
    /// Runs once per request and returns the response.
    fn infer(&mut self, request: &[u8]) -> Result<Vec<u8>>;
}

/// Reports why a call failed, so the host can show it to the renter. Used by
/// [`inference_service!`]; a batch job returns its error from `main` instead.
pub fn report_failure(error: &Error) {
    let message = error.to_string();
    let _ = sys::set_failure(sys::addr(message.as_ptr()), sys::len(message.len()));
}

#[doc(hidden)]
pub mod __service {
    use super::{Error, InferenceService, input, output, report_failure};
    use std::cell::RefCell;

    /// The glue behind [`inference_service!`](crate::inference_service): keeps the service
    /// between calls and maps its results to what the host expects.
    pub fn init<S: InferenceService>(slot: &'static std::thread::LocalKey<RefCell<Option<S>>>) -> i32 {
        let result = input().and_then(|bytes| S::init(&bytes));
        match result {
            Ok(service) => {
                slot.with(|s| *s.borrow_mut() = Some(service));
                0
            }
            Err(e) => fail(&e),
        }
    }

    pub fn infer<S: InferenceService>(slot: &'static std::thread::LocalKey<RefCell<Option<S>>>) -> i32 {
        let result = slot.with(|s| {
            let mut s = s.borrow_mut();
            let service = s.as_mut().ok_or_else(|| Error::kernel("infer called before init"))?;
            let request = input()?;
            let response = service.infer(&request)?;
            output(&response)
        });
        match result {
            Ok(()) => 0,
            Err(e) => fail(&e),
        }
    }

    fn fail(e: &Error) -> i32 {
        report_failure(e);
        e.code().map_or(-1, |c| c as i32)
    }
}

/// Exports an [`InferenceService`] type as this module's `wasmgrid_init` and `wasmgrid_infer`.
#[macro_export]
macro_rules! inference_service {
    ($service:ty) => {
        ::std::thread_local! {
            static __WASMGRID_SERVICE: ::std::cell::RefCell<::std::option::Option<$service>> =
                const { ::std::cell::RefCell::new(::std::option::Option::None) };
        }

        // SAFETY: the names are the exports `abi` reserves for inference services; nothing
        // else in a wasmgrid module defines them.
        #[allow(unsafe_code)]
        #[unsafe(no_mangle)]
        pub extern "C" fn wasmgrid_init() -> i32 {
            $crate::__service::init(&__WASMGRID_SERVICE)
        }

        #[allow(unsafe_code)]
        #[unsafe(no_mangle)]
        pub extern "C" fn wasmgrid_infer() -> i32 {
            $crate::__service::infer(&__WASMGRID_SERVICE)
        }
    };
}
