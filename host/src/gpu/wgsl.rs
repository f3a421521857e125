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

/// Deepest nesting of `()`, `[]` and `{}` a shader may have, each `else if` counting as one
/// more level (naga nests it inside the `else`). naga's parser stops brace nesting at 127 and
/// expression recursion at 200, but its lowering, its validator and the drivers' compilers
/// recurse without a limit of their own.
pub(crate) const MAX_NESTING: usize = 64;
/// Most tokens in one expression: from the start of a statement, or the last `,` at its level,
/// counting the tokens of every enclosing expression. An expression tree is no deeper than
/// that, and naga lowers it recursively: a flat sum of 300,000 terms overflowed a 2 MiB stack.
pub(crate) const MAX_EXPRESSION_TOKENS: usize = 4096;
/// Most declarations at module scope. naga orders them with a recursive depth-first search
/// over their uses, so a chain of declarations each using the next is as deep as it is long.
pub(crate) const MAX_DECLARATIONS: usize = 4096;

/// One open bracket while [`check_shape`] scans.
#[derive(Debug)]
struct Frame {
    close: u8,
    /// Tokens of the expressions this bracket sits inside (0 for a block: a statement starts a
    /// new expression tree).
    base: usize,
    /// Tokens since the start of the current statement or the last `,` at this level.
    run: usize,
    depth: usize,
    /// `else if`s so far in the `if` chain at this level.
    chain: usize,
    /// The last token at this level closed a block: an `else` would continue an `if` chain.
    after_block: bool,
}

impl Frame {
    fn new(close: u8, base: usize, depth: usize) -> Frame {
        Frame { close, base, run: 0, depth, chain: 0, after_block: false }
    }
}

/// Whitespace as naga's WGSL lexer has it (Unicode Pattern_White_Space).
fn is_blank(c: char) -> bool {
    matches!(c, ' ' | '\u{9}'..='\u{d}' | '\u{85}' | '\u{200e}' | '\u{200f}' | '\u{2028}' | '\u{2029}')
}

/// What ends a line comment in naga's WGSL lexer (a WGSL line break).
fn ends_line_comment(c: char) -> bool {
    matches!(c, '\u{a}'..='\u{d}' | '\u{85}' | '\u{2028}' | '\u{2029}')
}

/// Checks the shape of `source` before naga sees it: how deep brackets and `else if` chains
/// nest ([`MAX_NESTING`]), how long one expression is ([`MAX_EXPRESSION_TOKENS`]) and how many
/// declarations the module has ([`MAX_DECLARATIONS`]). These bound how deep naga and the
/// driver recurse over the shader, so that no source of any size can overflow the compile
/// thread's stack. One pass over the characters, with one frame per open bracket; the error is
/// a message for the kernel author.
///
/// It reads comments and whitespace exactly as naga's lexer does, and may only count more
/// tokens than naga sees (a run of letters and digits is one token, every other character is
/// one), never fewer. Anything else about the source is naga's to judge: at an unbalanced
/// bracket this check stops, since naga's parser fails there before it lowers anything.
pub(crate) fn check_shape(source: &str) -> Result<(), String> {
    let mut chars = source.chars().peekable();
    let mut stack = vec![Frame::new(0, 0, 0)];
    let (mut line, mut decls) = (1usize, 0usize);
    let mut prev_else = false;
    let too_many_decls = |line: usize| {
        format!("line {line}: more than {MAX_DECLARATIONS} declarations at module scope, over what this host compiles")
    };
    while let Some(c) = chars.next() {
        if c == '\n' {
            line += 1;
            continue;
        }
        if is_blank(c) {
            continue;
        }
        if c == '/' && chars.peek() == Some(&'/') {
            while chars.next_if(|&c| !ends_line_comment(c)).is_some() {}
            continue;
        }
        if c == '/' && chars.peek() == Some(&'*') {
            // Block comments nest in WGSL; an unterminated one is naga's error.
            chars.next();
            let mut open = 1usize;
            while open > 0 {
                match chars.next() {
                    None => break,
                    Some('*') if chars.peek() == Some(&'/') => {
                        chars.next();
                        open -= 1;
                    }
                    Some('/') if chars.peek() == Some(&'*') => {
                        chars.next();
                        open += 1;
                    }
                    Some('\n') => line += 1,
                    Some(_) => {}
                }
            }
            continue;
        }

        let Some(top) = stack.last_mut() else { return Ok(()) };
        let continues_chain = if c.is_alphanumeric() || c == '_' {
            // One word or number, however naga splits it further.
            let mut word = String::new();
            word.push(c);
            let number = c.is_ascii_digit();
            while let Some(n) = chars.next_if(|&n| n.is_alphanumeric() || n == '_' || (number && n == '.')) {
                if word.len() < 8 {
                    word.push(n);
                }
            }
            if word == "if" && prev_else {
                top.chain += 1;
            }
            prev_else = word == "else";
            top.run += 1;
            prev_else
        } else {
            prev_else = false;
            match c {
                '(' | '[' | '{' => {
                    top.run += 1;
                    let depth = top.depth + 1 + top.chain;
                    if depth > MAX_NESTING {
                        return Err(format!(
                            "line {line}: brackets (with `else if` chains) nest {depth} deep, over the {MAX_NESTING} \
                             levels this host compiles; move inner parts into functions or `let` bindings"
                        ));
                    }
                    let (close, base) = match c {
                        '(' => (b')', top.base + top.run),
                        '[' => (b']', top.base + top.run),
                        _ => (b'}', 0),
                    };
                    top.after_block = false;
                    stack.push(Frame::new(close, base, depth));
                    continue;
                }
                ')' | ']' | '}' => {
                    if top.close != c as u8 {
                        // Never valid WGSL: naga's parser stops here.
                        return Ok(());
                    }
                    stack.pop();
                    if let (Some(parent), '}') = (stack.last_mut(), c) {
                        parent.run = 0;
                        parent.after_block = true;
                        if parent.close == 0 {
                            decls += 1;
                            if decls > MAX_DECLARATIONS {
                                return Err(too_many_decls(line));
                            }
                        }
                    }
                    continue;
                }
                ';' => {
                    top.run = 0;
                    top.chain = 0;
                    if top.close == 0 {
                        decls += 1;
                        if decls > MAX_DECLARATIONS {
                            return Err(too_many_decls(line));
                        }
                    }
                    false
                }
                ',' => {
                    top.run = 0;
                    false
                }
                _ => {
                    top.run += 1;
                    false
                }
            }
        };
        if top.after_block && !continues_chain {
            top.chain = 0;
        }
        top.after_block = false;
        if top.base + top.run > MAX_EXPRESSION_TOKENS {
            return Err(format!(
                "line {line}: an expression of more than {MAX_EXPRESSION_TOKENS} tokens, over what this host compiles; \
                 split it into several statements with `let`"
            ));
        }
    }
    Ok(())
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

    /// Shaders of the shapes that make naga recurse, `n` deep.
    fn deep(shape: &str, n: usize) -> String {
        let head = "@group(0) @binding(0) var<storage, read_write> d: array<u32>;\n";
        let body = |e: String| {
            format!("{head}@compute @workgroup_size(1) fn main() {{ let x = d[0]; let y = i32(x); d[1] = {e}; }}\n")
        };
        match shape {
            "sum" => format!(
                "{head}fn f() -> u32 {{ return 1u{}; }}\n@compute @workgroup_size(1) fn main() {{ d[1] = f(); }}\n",
                "+1u".repeat(n - 1)
            ),
            "xsum" => body(format!("x{}", "+x".repeat(n - 1))),
            "neg" => body(format!("u32({}y)", "- ".repeat(n))),
            "parens" => body(format!("{}x{}", "(".repeat(n), ")".repeat(n))),
            "index" => {
                let e = format!("{}0u{}", "d[".repeat(n), "]".repeat(n));
                body(e)
            }
            "else-if" => {
                let mut c = String::from("if x == 0u { d[1] = 0u; }");
                for i in 1..n {
                    c.push_str(&format!(" else if x == {i}u {{ d[1] = {i}u; }}"));
                }
                format!("{head}@compute @workgroup_size(1) fn main() {{ let x = d[0]; {c} }}\n")
            }
            "blocks" => body(format!("x; {}{}", "{ ".repeat(n), "}".repeat(n)).replacen("x; ", "x;", 1)),
            "decls" => {
                let mut s = String::from(head);
                for i in 0..n {
                    s.push_str(&format!("const c{i} = c{};\n", i + 1));
                }
                s + &format!("const c{n} = 1u;\n@compute @workgroup_size(1) fn main() {{ d[1] = c0; }}\n")
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn the_samples_shaders_pass_the_shape_check() {
        for src in [include_str!("../../../samples/matmul/src/matmul.wgsl"), BENCH_SHADERS] {
            check_shape(src).unwrap();
        }
    }

    const BENCH_SHADERS: &str = r#"
        /* a /* nested */ comment */ // and a line comment
        @group(0) @binding(0) var<storage, read_write> d: array<f32>;
        const TABLE = array<f32, 8>(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0);
        @compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3<u32>) {
            if g.x == 0u { d[0] = 1.0; } else if g.x == 1u { d[0] = 2.0; } else { d[0] = TABLE[g.x % 8u]; }
            for (var i = 0u; i < 4u; i++) { d[i] = d[i] * 2.0 + 1.5e-3; }
        }
    "#;

    #[test]
    fn each_bound_is_refused_with_its_reason() {
        let refused = |src: &str| check_shape(src).unwrap_err();
        assert!(refused(&deep("sum", 300_000)).contains("expression of more than 4096 tokens"));
        assert!(refused(&deep("neg", 5000)).contains("expression of more than 4096 tokens"));
        assert!(refused(&deep("parens", 100)).contains("nest 65 deep"));
        assert!(refused(&deep("index", 100)).contains("nest 65 deep"));
        assert!(refused(&deep("blocks", 100)).contains("nest 65 deep"));
        assert!(refused(&deep("else-if", 100)).contains("nest 65 deep"));
        assert!(refused(&deep("decls", 5000)).contains("more than 4096 declarations"));
        // The line is named.
        assert!(refused(&format!("\n\n{}", deep("parens", 100))).starts_with("line 4: "));
    }

    #[test]
    fn commas_and_statements_end_an_expression() {
        // A long table is many short expressions, not one deep one.
        let table = format!("const T = array<u32, 5000>({});\n", vec!["1u"; 5000].join(", "));
        check_shape(&table).unwrap();
        let lets: String = (0..5000).map(|i| format!("let a{i} = {i}u + 1u;")).collect();
        check_shape(&format!("fn f() {{ {lets} }}")).unwrap();
        // But an argument inside a long expression adds to it.
        let inner = format!("x{}", "+x".repeat(1500));
        check_shape(&format!("fn f(x: u32) -> u32 {{ return {inner} + max(1u, {inner}); }}")).unwrap_err();
    }

    #[test]
    fn comments_hide_only_what_naga_skips() {
        let sum = format!("1u{}", "+1u".repeat(300_000));
        check_shape(&format!("// {sum}\n/* {sum} /* */ {sum} */ fn f() {{}}")).unwrap();
        // naga ends a line comment at any line break, not only a newline.
        for brk in ["\r", "\u{b}", "\u{c}", "\u{85}", "\u{2028}", "\u{2029}"] {
            assert!(check_shape(&format!("// x{brk} const c = {sum};")).is_err(), "{brk:?}");
        }
        // Unicode blank space separates tokens as ASCII space does.
        let spaced = format!("const c = 1u{};", "\u{2028}+\u{2028}1u".repeat(3000));
        assert!(check_shape(&spaced).is_err());
    }

    #[test]
    fn unbalanced_brackets_are_left_to_naga() {
        check_shape("fn main( {").unwrap();
        check_shape("fn main() { ) ").unwrap();
        assert!(check(" fn main( {", "main", &LIMITS).unwrap_err().contains("expected"));
    }

    /// The deepest shapes the check lets through parse and validate on a quarter of the
    /// compile thread's stack, in this (unoptimised) build too.
    #[test]
    fn the_deepest_shapes_that_pass_fit_a_quarter_of_the_compile_stack() {
        let shapes = [
            ("sum", 2047),
            ("xsum", 2040),
            ("neg", 4080),
            ("parens", 62),
            ("index", 62),
            ("else-if", 62),
            ("decls", 4090),
        ];
        for (shape, n) in shapes {
            let src = deep(shape, n);
            check_shape(&src).unwrap_or_else(|e| panic!("{shape} {n}: {e}"));
            let checked = std::thread::Builder::new()
                .stack_size(crate::gpu::COMPILE_STACK / 4)
                .spawn(move || check(&src, "main", &LIMITS).map(|_| ()))
                .unwrap()
                .join()
                .unwrap();
            checked.unwrap_or_else(|e| panic!("{shape} {n}: {e}"));
        }
    }

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
