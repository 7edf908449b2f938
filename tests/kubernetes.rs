//! The Kubernetes manifests in `contrib/kubernetes` cannot be applied on the
//! build machine, so their numbers are checked against each other and
//! against `echo-server` itself: every argument is a flag the server has,
//! the grace period outlasts the drain delay plus the shutdown timeout,
//! probe ports are the `--metrics` port, container ports are `--port`, and
//! the Service and the PodDisruptionBudget select the Deployment's pods.

mod common;

use std::time::Duration;

use yaml_rust2::{Yaml, YamlLoader};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/kubernetes");

fn load(name: &str) -> Yaml {
    let text = std::fs::read_to_string(format!("{DIR}/{name}"))
        .unwrap_or_else(|err| panic!("read {name}: {err}"));
    let mut documents =
        YamlLoader::load_from_str(&text).unwrap_or_else(|err| panic!("{name} is not YAML: {err}"));
    assert_eq!(documents.len(), 1, "{name} holds one document");
    documents.remove(0)
}

/// The value at `path` (keys, or indices for lists), failing with the path.
fn at<'a>(yaml: &'a Yaml, path: &[&str]) -> &'a Yaml {
    path.iter().fold(yaml, |node, key| {
        let next = match key.parse::<usize>() {
            Ok(index) => &node[index],
            Err(_) => &node[*key],
        };
        assert!(!next.is_badvalue(), "no {path:?} in the manifest");
        next
    })
}

fn text<'a>(yaml: &'a Yaml, path: &[&str]) -> &'a str {
    at(yaml, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path:?} is not text"))
}

fn number(yaml: &Yaml, path: &[&str]) -> i64 {
    at(yaml, path)
        .as_i64()
        .unwrap_or_else(|| panic!("{path:?} is not a number"))
}

/// The container's arguments as (flag, value): a flag's value is the next
/// item when that is not a flag itself.
fn arguments(deployment: &Yaml) -> Vec<(String, Option<String>)> {
    let items: Vec<&str> = at(
        deployment,
        &["spec", "template", "spec", "containers", "0", "args"],
    )
    .as_vec()
    .expect("args is a list")
    .iter()
    .map(|arg| arg.as_str().expect("each argument is text (quote numbers)"))
    .collect();
    let mut pairs = Vec::new();
    let mut at = 0;
    while at < items.len() {
        let flag = items[at];
        assert!(flag.starts_with('-'), "{flag:?} is not a flag");
        match items.get(at + 1) {
            Some(value) if !value.starts_with('-') => {
                pairs.push((flag.to_string(), Some(value.to_string())));
                at += 2;
            }
            _ => {
                pairs.push((flag.to_string(), None));
                at += 1;
            }
        }
    }
    pairs
}

fn argument(arguments: &[(String, Option<String>)], flag: &str) -> String {
    arguments
        .iter()
        .find(|(name, _)| name == flag)
        .and_then(|(_, value)| value.clone())
        .unwrap_or_else(|| panic!("the container has no {flag}=VALUE"))
}

fn seconds(duration: &str) -> f64 {
    humantime::parse_duration(duration)
        .unwrap_or_else(|err| panic!("{duration:?} is not a duration: {err}"))
        .as_secs_f64()
}

#[test]
fn every_container_argument_is_an_echo_server_flag() {
    common::with_time_limit(Duration::from_secs(60), || {
        let deployment = load("deployment.yaml");
        let help = common::run_to_end(common::SERVER_BIN, &["--help"], Duration::from_secs(20));
        let help = String::from_utf8_lossy(&help.stdout).into_owned();
        // The whole argument list parses: with --version the server checks
        // every flag and value, prints its version and binds nothing.
        let args: Vec<String> = at(
            &deployment,
            &["spec", "template", "spec", "containers", "0", "args"],
        )
        .as_vec()
        .expect("a list")
        .iter()
        .map(|arg| arg.as_str().expect("text").to_string())
        .chain(["--version".to_string()])
        .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let parsed = common::run_to_end(common::SERVER_BIN, &args, Duration::from_secs(20));
        assert_eq!(
            parsed.status.code(),
            Some(0),
            "echo-server {args:?}: {}",
            String::from_utf8_lossy(&parsed.stderr)
        );
        for (flag, _) in arguments(&deployment) {
            assert!(
                help.contains(&format!(" {flag}")),
                "echo-server has no {flag}:\n{help}"
            );
        }
    });
}

#[test]
fn the_grace_period_outlasts_the_drain_delay_and_the_shutdown_timeout() {
    let deployment = load("deployment.yaml");
    let args = arguments(&deployment);
    let grace = number(
        &deployment,
        &["spec", "template", "spec", "terminationGracePeriodSeconds"],
    ) as f64;
    let drain = seconds(&argument(&args, "--drain-delay"))
        + seconds(&argument(&args, "--shutdown-timeout"));
    assert!(
        grace > drain,
        "terminationGracePeriodSeconds {grace} must be more than {drain} s"
    );
}

#[test]
fn ports_and_probes_agree_with_the_flags() {
    let deployment = load("deployment.yaml");
    let args = arguments(&deployment);
    let port: i64 = argument(&args, "--port").parse().expect("a port");
    let metrics: std::net::SocketAddr = argument(&args, "--metrics").parse().expect("an address");
    let container = at(
        &deployment,
        &["spec", "template", "spec", "containers", "0"],
    );
    let ports = at(container, &["ports"]).as_vec().expect("a list of ports");
    let named = |name: &str| {
        ports
            .iter()
            .find(|entry| entry["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no container port named {name}"))
    };
    let serves = |flag: &str| args.iter().any(|(name, _)| name == flag);
    assert!(
        serves("--tcp") && serves("--udp"),
        "the Deployment serves TCP and UDP"
    );
    for (name, protocol) in [("echo-tcp", "TCP"), ("echo-udp", "UDP")] {
        assert_eq!(
            number(named(name), &["containerPort"]),
            port,
            "{name} is --port"
        );
        assert_eq!(text(named(name), &["protocol"]), protocol);
    }
    assert_eq!(
        number(named("metrics"), &["containerPort"]),
        i64::from(metrics.port())
    );
    assert!(
        metrics.ip().is_unspecified(),
        "probes come from the kubelet: --metrics must not be loopback"
    );
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(text(container, &[probe, "httpGet", "path"]), path);
        assert_eq!(text(container, &[probe, "httpGet", "port"]), "metrics");
    }
}

#[test]
fn the_service_and_the_budget_select_the_deployments_pods() {
    let deployment = load("deployment.yaml");
    let service = load("service.yaml");
    let budget = load("pdb.yaml");
    let labels = at(&deployment, &["spec", "template", "metadata", "labels"]);
    assert_eq!(at(&service, &["spec", "selector"]), labels);
    assert_eq!(at(&budget, &["spec", "selector", "matchLabels"]), labels);
    assert_eq!(
        at(&deployment, &["spec", "selector", "matchLabels"]),
        labels
    );
    let container_ports: Vec<&str> = at(
        &deployment,
        &["spec", "template", "spec", "containers", "0", "ports"],
    )
    .as_vec()
    .expect("a list")
    .iter()
    .filter_map(|entry| entry["name"].as_str())
    .collect();
    for entry in at(&service, &["spec", "ports"]).as_vec().expect("a list") {
        let target = text(entry, &["targetPort"]);
        assert!(
            container_ports.contains(&target),
            "the Service targets {target}, which no container port is"
        );
    }
    let replicas = number(&deployment, &["spec", "replicas"]);
    let unavailable = number(&budget, &["spec", "maxUnavailable"]);
    assert!(
        unavailable < replicas,
        "the budget must leave a pod serving"
    );
}
