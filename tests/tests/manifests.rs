//! Issue 9: the Kubernetes manifests in deploy/ validate against the
//! Kubernetes schemas, and agree with the image, the config schema and the
//! capabilities dogslow checks for.
//!
//! The validator (`kubernetes-validate`, PyPI) and a YAML/TOML reader live
//! in target/k8s-venv, which `cargo xtask setup` creates.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::{Value, json};

/// The oldest Kubernetes with `appArmorProfile` in the securityContext, and
/// the newest the validator knows.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn venv_bin(name: &str) -> PathBuf {
    let path = root().join("target/k8s-venv/bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask setup`",
        path.display()
    );
    path
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy"))
        .expect("deploy/ exists")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "manifests: {files:?}");
    files
}

/// Runs the venv's python with `script`, `stdin` and `args`; parses its JSON output.
fn python_json(script: &str, stdin: &str, args: &[PathBuf]) -> Value {
    use std::io::Write as _;
    let mut child = Command::new(venv_bin("python"))
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the venv's python");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("python printed JSON")
}

/// Every document of every manifest.
fn documents() -> Vec<Value> {
    let all = python_json(
        "import json, sys, yaml\n\
         json.dump([d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d], sys.stdout)",
        "",
        &manifests(),
    );
    all.as_array().unwrap().clone()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in deploy/"))
}

#[test]
fn the_manifests_validate_against_the_kubernetes_schemas() {
    let files = manifests();
    for version in KUBERNETES_VERSIONS {
        let out = Command::new(venv_bin("kubernetes-validate"))
            .args(["--strict", "--kubernetes-version", version])
            .args(&files)
            .output()
            .expect("run kubernetes-validate");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "deploy/ does not validate against Kubernetes {version}:\n{text}"
        );
        // Every file was checked as a known resource, none skipped.
        for file in &files {
            assert!(
                text.lines()
                    .any(|l| l.contains(&*file.to_string_lossy()) && l.contains("passed")),
                "{} not validated against {version}:\n{text}",
                file.display()
            );
        }
    }
}

#[test]
fn the_daemonset_holds_exactly_the_capabilities_dogslow_checks_for() {
    let docs = documents();
    let daemonset = find(&docs, "DaemonSet");
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    assert_ne!(pod["hostNetwork"], true, "metrics stay in the pod's netns");
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
    let container = &pod["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(security["privileged"], false);
    assert_eq!(security["runAsUser"], 0, "added capabilities need uid 0");
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    let required: Vec<String> = dogslow::privileges::required_capabilities()
        .map(|name| name.trim_start_matches("CAP_").to_owned())
        .collect();
    assert_eq!(
        security["capabilities"]["add"],
        json!(required),
        "deploy/30-daemonset.yaml and privileges.rs disagree"
    );
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(
            container[probe]["httpGet"],
            json!({"path": "/healthz", "port": "metrics"}),
            "{probe}"
        );
    }
    for bound in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                container["resources"][bound][resource].is_string(),
                "no {bound}.{resource}"
            );
        }
    }
}

#[test]
fn the_daemonset_runs_the_image_on_the_configmap() {
    let docs = documents();
    let pod = &find(&docs, "DaemonSet")["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    // The Containerfile's CMD, spelled out.
    let containerfile = std::fs::read_to_string(root().join("deploy/Containerfile")).unwrap();
    assert!(containerfile.contains(r#"CMD ["run", "--config", "/etc/dogslow/dogslow.toml"]"#));
    assert_eq!(
        container["args"],
        json!(["run", "--config", "/etc/dogslow/dogslow.toml"])
    );
    let mount = |name: &str| -> Value {
        container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no mount {name}"))
            .clone()
    };
    let volume = |name: &str| -> Value {
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
            .clone()
    };
    assert_eq!(mount("config")["mountPath"], "/etc/dogslow");
    let configmap = find(&docs, "ConfigMap");
    assert_eq!(
        volume("config")["configMap"]["name"],
        configmap["metadata"]["name"]
    );
    // Read-only host paths for what dogslow only reads.
    assert_eq!(mount("sys-kernel-btf")["readOnly"], true);
    assert_eq!(
        volume("sys-kernel-btf")["hostPath"]["path"],
        "/sys/kernel/btf"
    );

    // The config is TOML in the schema `dogslow run --config` reads, and
    // agrees with the pod: metrics port, report directory.
    let toml = configmap["data"]["dogslow.toml"]
        .as_str()
        .expect("the ConfigMap holds dogslow.toml");
    let config = python_json(
        "import json, sys, tomllib\njson.dump(tomllib.loads(sys.stdin.read()), sys.stdout)",
        toml,
        &[],
    );
    let metrics = config["agent"]["metrics_addr"].as_str().unwrap();
    assert_eq!(metrics, "0.0.0.0:9464");
    assert_eq!(container["ports"][0]["containerPort"], 9464);
    assert_eq!(container["ports"][0]["name"], "metrics");
    assert_eq!(config["output"]["format"], "json");
    assert_eq!(
        config["output"]["output_dir"],
        mount("reports")["mountPath"]
    );
    assert_ne!(mount("reports")["readOnly"], true);
    let targets = config["target"].as_array().expect("[[target]] tables");
    assert!(!targets.is_empty());
    // And dogslow's own parser takes it as it is: every key known, every
    // value valid.
    let parsed =
        dogslow::config_file::parse(std::path::Path::new("deploy/20-configmap.yaml"), toml, None)
            .unwrap_or_else(|err| panic!("dogslow run --config rejects the ConfigMap: {err}"));
    assert_eq!(parsed.targets.len(), targets.len());
    assert_eq!(parsed.metrics_addr, Some("0.0.0.0:9464".parse().unwrap()));
}
