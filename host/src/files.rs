//! A folder read as one file bundle ([`abi::files`]): how a model folder becomes one init input.

use std::path::Path;

/// The files under `root` as a bundle: names relative to `root` with `/` between parts, sorted.
/// Names starting with `.` are left out (a `.git`, a stamp file); links to files are followed,
/// links to folders are not. Fails, naming the path, on anything unreadable or a name a bundle
/// cannot hold.
pub fn bundle_dir(root: &Path) -> Result<Vec<u8>, String> {
    fn walk(root: &Path, dir: &Path, files: &mut Vec<(String, Vec<u8>)>) -> Result<(), String> {
        let entries = std::fs::read_dir(dir).map_err(|e| format!("reading the folder {}: {e}", dir.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("reading the folder {}: {e}", dir.display()))?;
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let kind = entry.file_type().map_err(|e| format!("reading {}: {e}", path.display()))?;
            if kind.is_dir() {
                walk(root, &path, files)?;
            } else if path.is_file() {
                let name = path
                    .strip_prefix(root)
                    .ok()
                    .and_then(|p| p.to_str())
                    .map(|p| p.replace(std::path::MAIN_SEPARATOR, "/"))
                    .filter(|n| abi::files::valid_name(n))
                    .ok_or_else(|| format!("{} has a name a file bundle cannot hold (UTF-8 only)", path.display()))?;
                let bytes = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
                files.push((name, bytes));
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(root, root, &mut files)?;
    if files.is_empty() {
        return Err(format!("the folder {} holds no files", root.display()));
    }
    abi::files::encode(&files).map_err(|e| format!("bundling the folder {}: {e}", root.display()))
}
