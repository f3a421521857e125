//! Checks a guest's WGSL before any of it reaches wgpu or the driver, and reads off what the
//! host needs to bind and meter it: the entry point's bindings and workgroup size.

use naga::valid::{Capabilities, ValidationFlags, Validator};

/// How a pipeline binding is declared in WGSL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BindingKind {
    Storage { read_only: bool },
    Uniform,
}

impl BindingKind {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            BindingKind::Storage { read_only: true } => "var<storage, read>",
            BindingKind::Storage { read_only: false } => "var<storage, read_write>",
            BindingKind::Uniform => "var<uniform>",
        }
    }
}

/// One `@group(0) @binding(n)` the entry point uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BindingInfo {
    pub(crate) binding: u32,
    pub(crate) kind: BindingKind,
    /// The smallest buffer that fits the declared type (for a runtime-sized array, one element).
    pub(crate) min_size: u64,
}

/// What the host knows of a checked entry point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Reflection {
    /// The bindings the entry point uses; each must get a buffer.
    pub(crate) bindings: Vec<BindingInfo>,
    /// Every `@group(0)` binding the module declares. A dispatch may pass a buffer for one its
    /// entry point does not use (several entry points often share one binding list).
    pub(crate) declared: Vec<u32>,
    pub(crate) workgroup_size: [u32; 3],
}

/// Device limits a shader must fit in.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ShaderLimits {
    pub(crate) max_workgroup_size: [u32; 3],
    pub(crate) max_invocations_per_workgroup: u32,
    pub(crate) max_bindings: u32,
    pub(crate) max_workgroup_storage_bytes: u32,
}

/// Parses and validates `source` and checks that `entry` is a compute entry point this host can
/// run. The error is a message for the kernel author.
pub(crate) fn check(source: &str, entry: &str, limits: &ShaderLimits) -> Result<Reflection, String> {
    let module = naga::front::wgsl::parse_str(source).map_err(|e| e.emit_to_string(source))?;
    let info = Validator::new(ValidationFlags::all(), Capabilities::empty())
        .validate(&module)
        .map_err(|e| e.emit_to_string(source))?;

    if !module.overrides.is_empty() {
        return Err("pipeline-overridable constants (`override`) are not supported; use `const`".into());
    }
    let (index, ep) = module.entry_points.iter().enumerate().find(|(_, ep)| ep.name == entry).ok_or_else(|| {
        let names: Vec<&str> = module.entry_points.iter().map(|e| e.name.as_str()).collect();
        format!("no entry point named `{entry}` (the shader has: {})", names.join(", "))
    })?;
    if ep.stage != naga::ShaderStage::Compute {
        return Err(format!("entry point `{entry}` is not a @compute function"));
    }

    let size = ep.workgroup_size;
    for (axis, (n, max)) in ["x", "y", "z"].iter().zip(size.iter().zip(limits.max_workgroup_size)) {
        if *n > max {
            return Err(format!("@workgroup_size {axis} = {n} exceeds this device's maximum of {max}"));
        }
    }
    let invocations = size.iter().map(|&n| u64::from(n)).product::<u64>();
    if invocations > u64::from(limits.max_invocations_per_workgroup) {
        return Err(format!(
            "@workgroup_size of {invocations} invocations exceeds this device's maximum of {}",
            limits.max_invocations_per_workgroup
        ));
    }

    let used = info.get_entry_point(index);
    let gctx = module.to_ctx();
    let mut bindings = Vec::new();
    let mut workgroup_bytes = 0u64;
    let declared: Vec<u32> = module
        .global_variables
        .iter()
        .filter_map(|(_, v)| v.binding.as_ref())
        .filter(|b| b.group == 0)
        .map(|b| b.binding)
        .collect();
    for (handle, var) in module.global_variables.iter() {
        if used[handle].is_empty() {
            continue;
        }
        let ty = &module.types[var.ty].inner;
        let kind = match var.space {
            naga::AddressSpace::Storage { access } => {
                BindingKind::Storage { read_only: !access.contains(naga::StorageAccess::STORE) }
            }
            naga::AddressSpace::Uniform => BindingKind::Uniform,
            naga::AddressSpace::WorkGroup => {
                workgroup_bytes += u64::from(ty.size(gctx));
                continue;
            }
            naga::AddressSpace::Private | naga::AddressSpace::Function => continue,
            _ => {
                let name = var.name.as_deref().unwrap_or("?");
                return Err(format!(
                    "`{name}` is a {:?} resource; kernels may bind only storage and uniform buffers",
                    var.space
                ));
            }
        };
        let binding = var.binding.as_ref().ok_or("a buffer has no @binding")?;
        if binding.group != 0 {
            return Err(format!("@group({}) is not supported: put every buffer in @group(0)", binding.group));
        }
        if binding.binding >= limits.max_bindings {
            return Err(format!(
                "@binding({}) is beyond this device's {} bindings",
                binding.binding, limits.max_bindings
            ));
        }
        bindings.push(BindingInfo { binding: binding.binding, kind, min_size: u64::from(ty.size(gctx)).max(4) });
    }
    if workgroup_bytes > u64::from(limits.max_workgroup_storage_bytes) {
        return Err(format!(
            "var<workgroup> data of {workgroup_bytes} bytes exceeds this device's {} bytes",
            limits.max_workgroup_storage_bytes
        ));
    }
    bindings.sort_by_key(|b| b.binding);
    Ok(Reflection { bindings, declared, workgroup_size: size })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ShaderLimits = ShaderLimits {
        max_workgroup_size: [256, 256, 64],
        max_invocations_per_workgroup: 256,
        max_bindings: 8,
        max_workgroup_storage_bytes: 16384,
    };

    #[test]
    fn reflects_bindings_and_workgroup_size() {
        let src = r#"
            struct Dims { n: u32, m: u32 }
            @group(0) @binding(0) var<storage, read> a: array<f32>;
            @group(0) @binding(2) var<storage, read_write> out: array<f32>;
            @group(0) @binding(1) var<uniform> dims: Dims;
            @group(0) @binding(3) var<storage, read_write> unused: array<f32>;
            @compute @workgroup_size(8, 4, 1)
            fn main(@builtin(global_invocation_id) id: vec3<u32>) {
                if (id.x < dims.n) { out[id.x] = a[id.x]; }
            }
        "#;
        let r = check(src, "main", &LIMITS).unwrap();
        assert_eq!(r.workgroup_size, [8, 4, 1]);
        assert_eq!(
            r.bindings,
            vec![
                BindingInfo { binding: 0, kind: BindingKind::Storage { read_only: true }, min_size: 4 },
                BindingInfo { binding: 1, kind: BindingKind::Uniform, min_size: 8 },
                BindingInfo { binding: 2, kind: BindingKind::Storage { read_only: false }, min_size: 4 },
            ]
        );
    }

    #[test]
    fn rejects_what_the_host_cannot_run() {
        let ok_body = "@compute @workgroup_size(1) fn main() {}";
        assert!(check("fn main( {", "main", &LIMITS).unwrap_err().contains("expected"));
        assert!(check(ok_body, "other", &LIMITS).unwrap_err().contains("no entry point"));
        let big = "@compute @workgroup_size(512) fn main() {}";
        assert!(check(big, "main", &LIMITS).unwrap_err().contains("exceeds"));
        let group1 = "@group(1) @binding(0) var<storage, read_write> a: array<f32>;
            @compute @workgroup_size(1) fn main() { a[0] = 1.0; }";
        assert!(check(group1, "main", &LIMITS).unwrap_err().contains("@group(1)"));
        let tex = "@group(0) @binding(0) var t: texture_2d<f32>;
            @compute @workgroup_size(1) fn main() { _ = textureDimensions(t); }";
        assert!(check(tex, "main", &LIMITS).unwrap_err().contains("storage and uniform"));
        let ovr = "override n: u32 = 4u; @compute @workgroup_size(1) fn main() { _ = n; }";
        assert!(check(ovr, "main", &LIMITS).unwrap_err().contains("override"));
    }
}
