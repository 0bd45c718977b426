//! `cargo xtask image`: the agent's OCI image, built with buildah from the release binary and
//! nothing else — no base image, so nothing is pulled.
//!
//! The image holds `/usr/local/bin/breakwater`, the shared libraries `ldd` says it loads (glibc,
//! libgcc_s) at the paths it names them by, and the dynamic loader: the layout deploy/Containerfile
//! builds from source, and what deploy/kubernetes/daemonset.yaml runs. Its timestamps are fixed
//! (`SOURCE_DATE_EPOCH`, else the last commit's time), so the same binary at the same commit makes
//! the same image ID and rebuilding leaves no untagged images behind.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{output, run, Workspace};

/// Where `cargo xtask image` puts the image, tagged with the workspace's version.
pub const REPOSITORY: &str = "localhost/breakwater";
/// The agent in the image: the DaemonSet's `command` and the Containerfile's ENTRYPOINT.
const BINARY: &str = "/usr/local/bin/breakwater";
/// The image's default arguments: the Containerfile's CMD (the DaemonSet passes its own).
const CMD: &[&str] = &["agent", "--config", "/etc/breakwater/breakwater.toml"];
/// The Containerfile's ENV: `kubectl exec POD -- breakwater services` finds the binary.
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(clap::Args)]
pub struct Args {
    /// The image's name [default: localhost/breakwater:<workspace version>]
    #[arg(long)]
    pub tag: Option<String>,
    /// Also write the image to FILE as an OCI archive (`podman load -i FILE`,
    /// `skopeo copy oci-archive:FILE docker://REGISTRY/breakwater:TAG`)
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// `localhost/breakwater:<version>`.
pub fn default_tag() -> String {
    format!("{REPOSITORY}:{}", env!("CARGO_PKG_VERSION"))
}

/// Setup, the release build, then the image (and the archive, if asked for).
pub fn run_task(ws: &Workspace, args: &Args) -> Result<()> {
    let bin = crate::build(ws)?;
    let tag = args.tag.clone().unwrap_or_else(default_tag);
    let id = build(ws, &bin, &tag)?;
    println!("built: {tag} ({id})");
    if let Some(file) = &args.output {
        // The archive names the image, so that `podman load` tags it again.
        let dest = format!("oci-archive:{}:{tag}", file.display());
        run(Command::new("buildah").args(["push", "--quiet", &tag, &dest]))?;
        println!("wrote: {} (oci-archive)", file.display());
    }
    println!(
        "run:   podman run --runtime runc ... {tag} (the DaemonSet's settings: README \"Container \
         image\")"
    );
    Ok(())
}

/// Builds the image of `bin` as `tag`; returns its ID. An image that held `tag` before and is
/// left untagged by this one is removed.
pub fn build(ws: &Workspace, bin: &Path, tag: &str) -> Result<String> {
    if which::which("buildah").is_err() {
        bail!("buildah is missing: run `cargo xtask setup` as root (Debian package buildah)");
    }
    let previous = image_ids(&[tag]).into_iter().next();

    let rootfs = tempfile::tempdir().context("creating a staging directory")?;
    stage(bin, rootfs.path())?;

    let container = Container::from_scratch()?;
    run(Command::new("buildah")
        .args(["copy", "--quiet", &container.0])
        .arg(rootfs.path())
        .arg("/"))?;
    let json = |words: &[&str]| serde_json::to_string(words).expect("strings serialize");
    let version = env!("CARGO_PKG_VERSION");
    run(Command::new("buildah")
        .arg("config")
        .args(["--entrypoint", &json(&[BINARY])])
        .args(["--cmd", &json(CMD)])
        .args(["--env", PATH_ENV])
        // Root with the capabilities the DaemonSet adds: bpffs, bpf() and /proc/<pid>/ns.
        .args(["--user", "0", "--workingdir", "/"])
        .args(["--os", "linux", "--arch", "amd64"])
        .args(["--created-by", "cargo xtask image"])
        .args(["--label", "org.opencontainers.image.title=breakwater"])
        .args([
            "--label",
            "org.opencontainers.image.description=Per-node eBPF TCP connection counts and circuit \
             breakers",
        ])
        .args([
            "--label",
            "org.opencontainers.image.licenses=MIT OR Apache-2.0",
        ])
        .args([
            "--label",
            &format!("org.opencontainers.image.version={version}"),
        ])
        .arg(&container.0))?;
    let timestamp = source_date_epoch(ws);
    let id = output(
        Command::new("buildah")
            .args(["commit", "--quiet", "--rm", "--format", "oci"])
            .args(["--timestamp", &timestamp.to_string()])
            .args([&container.0, tag]),
    )?;
    container.committed();
    let id = bare_id(&id);

    // The same binary makes the same image; a new one leaves the old untagged: remove it unless
    // it has other names or a container uses it.
    if let Some(old) = previous.filter(|old| *old != id) {
        let dangling = image_ids(&["--filter", "dangling=true"]).contains(&old);
        if dangling && output(Command::new("buildah").args(["rmi", &old])).is_err() {
            println!("note: {old}, {tag} before, is in use: left in place");
        }
    }
    Ok(id)
}

/// `buildah images --quiet --no-trunc ARGS`, without their `sha256:`; none if it fails (no such
/// image).
fn image_ids(args: &[&str]) -> Vec<String> {
    output(
        Command::new("buildah")
            .args(["images", "--quiet", "--no-trunc"])
            .args(args),
    )
    .map(|ids| {
        ids.lines()
            .map(bare_id)
            .filter(|id| !id.is_empty())
            .collect()
    })
    .unwrap_or_default()
}

/// An image ID as `buildah commit` prints it: hex, no `sha256:`.
fn bare_id(id: &str) -> String {
    let id = id.trim();
    id.strip_prefix("sha256:").unwrap_or(id).to_string()
}

/// Copies `bin` to `rootfs`/usr/local/bin/breakwater and every library `ldd` resolves (symlinks
/// followed) to the same path under `rootfs`.
fn stage(bin: &Path, rootfs: &Path) -> Result<()> {
    let ldd = Command::new("ldd")
        .arg(bin)
        .output()
        .context("could not start ldd (Debian package libc-bin)")?;
    let text = String::from_utf8_lossy(&ldd.stdout);
    // A static binary needs nothing but itself (ldd says so, and fails unless it is static-pie).
    let libraries =
        if text.contains("not a dynamic executable") || text.contains("statically linked") {
            Vec::new()
        } else if ldd.status.success() {
            shared_libraries(&text)?
        } else {
            bail!(
                "`ldd {}` failed ({}): {}{}",
                bin.display(),
                ldd.status,
                text.trim(),
                String::from_utf8_lossy(&ldd.stderr).trim()
            );
        };
    let relative = |path: &Path| rootfs.join(path.strip_prefix("/").unwrap_or(path));
    let mut files = vec![(bin.to_path_buf(), relative(Path::new(BINARY)))];
    files.extend(libraries.iter().map(|lib| (lib.clone(), relative(lib))));
    for (from, to) in files {
        fs::create_dir_all(to.parent().context("a file under rootfs")?)
            .with_context(|| format!("creating the directory of {}", to.display()))?;
        // fs::copy follows symlinks and keeps the mode bits.
        fs::copy(&from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

/// The absolute paths of the libraries and loader in `ldd`'s output, in its order. The vDSO has
/// no file; a library ldd cannot find is an error.
fn shared_libraries(ldd: &str) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for line in ldd.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.ends_with("=> not found") {
            bail!("ldd: a library is missing: {line}");
        }
        // `libc.so.6 => /lib/.../libc.so.6 (0x...)`, or the loader: `/lib64/ld-linux-x86-64.so.2 (0x...)`.
        let path = match line.split_once("=>") {
            Some((_, resolved)) => resolved.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            paths.push(PathBuf::from(path));
        }
    }
    if paths.is_empty() {
        bail!("ldd printed no library paths:\n{ldd}");
    }
    Ok(paths)
}

/// Seconds since the epoch for every timestamp in the image: `SOURCE_DATE_EPOCH` if set, else
/// HEAD's commit time, else 0.
fn source_date_epoch(ws: &Workspace) -> u64 {
    env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .or_else(|| {
            output(
                Command::new("git")
                    .arg("-C")
                    .arg(&ws.root)
                    .args(["log", "-1", "--format=%ct"]),
            )
            .ok()
            .and_then(|s| s.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// A buildah working container, removed on drop unless committed (`commit --rm` removes it).
struct Container(String);

impl Container {
    fn from_scratch() -> Result<Self> {
        let name = output(Command::new("buildah").args(["from", "scratch"]))?;
        Ok(Self(name.trim().to_string()))
    }

    fn committed(mut self) {
        self.0.clear();
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            let _ = output(Command::new("buildah").args(["rm", &self.0]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_names_libraries_and_loader() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f1)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        assert_eq!(
            shared_libraries(text).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert!(shared_libraries("\tlibfoo.so.1 => not found\n").is_err());
        assert!(shared_libraries("\tlinux-vdso.so.1 (0x1)\n").is_err());
    }
}
