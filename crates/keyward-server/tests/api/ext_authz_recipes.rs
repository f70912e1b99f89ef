//! The Envoy recipes of `docs/proxies/envoy.md`, checked against Envoy's v3 protos as far as they
//! allow without an Envoy binary: every YAML block is parsed, and every field name of the
//! `ext_authz` filters, the connection manager, the route and the `keyward` cluster must be a field of
//! its protobuf message (a oneof by one of its cases), every `@type` the message it configures, and
//! every enum value a value of its enum. A misspelt field, which Envoy refuses at start, fails here.

use std::collections::BTreeSet;
use std::fmt::Debug;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    self as core, ApiVersion, GrpcService, HealthCheck, HttpUri, SocketAddress, address, grpc_service, health_check,
    http_uri, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::route::v3::{Route, route};
use envoy_types::pb::envoy::extensions::filters::http::ext_authz::v3::{
    AuthorizationResponse, ExtAuthz, HttpService, ext_authz,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{HttpProtocolOptions, http_protocol_options};
use envoy_types::pb::envoy::r#type::matcher::v3::{ListStringMatcher, StringMatcher, string_matcher};
use envoy_types::pb::envoy::r#type::v3::{HttpStatus, StatusCode};
use prost::Name;
use serde_json::Value;

/// How a field's value is checked.
#[derive(Clone, Copy)]
enum Field {
    Message(fn() -> Schema),
    Messages(fn() -> Schema),
    /// A map of `Any`s keyed by their type's name (`typed_extension_protocol_options`).
    AnyMap(fn() -> Schema),
    Enum(fn(&str) -> bool),
}

/// A message: its field names (a oneof by its cases), the type URL its `@type` must be, and how the
/// fields this test opens are checked.
struct Schema {
    name: String,
    type_url: String,
    fields: BTreeSet<String>,
    nested: Vec<(&'static str, Field)>,
}

/// The field names of `M` as prost's `Debug` lists them (every field of the message, a oneof by its
/// own name), with the oneofs named in `oneofs` replaced by their cases.
fn schema<M: Name + Default + Debug>(oneofs: &[(&str, Vec<String>)], nested: Vec<(&'static str, Field)>) -> Schema {
    let mut fields = top_level_names(&format!("{:?}", M::default()));
    for (oneof, cases) in oneofs {
        assert!(fields.remove(*oneof), "{} has no oneof {oneof}", M::full_name());
        fields.extend(cases.iter().cloned());
    }
    for (field, _) in &nested {
        assert!(fields.contains(*field), "{} has no field {field}", M::full_name());
    }
    Schema { name: M::full_name(), type_url: M::type_url(), fields, nested }
}

/// `Name { a: 1, b: None, c: {} }` → {a, b, c}.
fn top_level_names(debug: &str) -> BTreeSet<String> {
    let inner = debug.split_once('{').map(|(_, rest)| rest).unwrap_or("");
    let mut names = BTreeSet::new();
    let (mut depth, mut token, mut in_string) = (0usize, String::new(), false);
    for c in inner.chars() {
        match c {
            '"' => in_string = !in_string,
            _ if in_string => {}
            '{' | '[' | '(' => depth += 1,
            '}' | ']' | ')' => depth = depth.saturating_sub(1),
            ':' if depth == 0 && !token.trim().is_empty() => {
                names.insert(token.trim().trim_start_matches("r#").to_owned());
                token.clear();
            }
            ',' if depth == 0 => token.clear(),
            _ if depth == 0 => token.push(c),
            _ => {}
        }
    }
    names
}

/// The proto names of oneof cases.
macro_rules! cases {
    ($($case:expr),+ $(,)?) => { vec![$(case($case)),+] };
}

/// The proto name of a oneof case: `GrpcService(..)` → `grpc_service`.
fn case<T: Debug>(value: T) -> String {
    let debug = format!("{value:?}");
    let variant = debug.split(['(', ' ', '{']).next().unwrap_or_default();
    let mut out = String::new();
    for (i, c) in variant.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

fn ext_authz_schema() -> Schema {
    use ext_authz::Services;
    schema::<ExtAuthz>(
        &[(
            "services",
            cases![Services::GrpcService(GrpcService::default()), Services::HttpService(HttpService::default())],
        )],
        vec![
            ("transport_api_version", Field::Enum(|s| ApiVersion::from_str_name(s).is_some())),
            ("grpc_service", Field::Message(grpc_service_schema)),
            ("http_service", Field::Message(http_service_schema)),
            ("status_on_error", Field::Message(http_status_schema)),
            ("allowed_headers", Field::Message(list_matcher_schema)),
        ],
    )
}

fn grpc_service_schema() -> Schema {
    use grpc_service::TargetSpecifier::{EnvoyGrpc, GoogleGrpc};
    schema::<GrpcService>(
        &[("target_specifier", cases![EnvoyGrpc(Default::default()), GoogleGrpc(Default::default())])],
        vec![("envoy_grpc", Field::Message(|| schema::<grpc_service::EnvoyGrpc>(&[], vec![])))],
    )
}

fn http_service_schema() -> Schema {
    schema::<HttpService>(
        &[],
        vec![
            ("server_uri", Field::Message(http_uri_schema)),
            ("authorization_response", Field::Message(authorization_response_schema)),
        ],
    )
}

fn http_uri_schema() -> Schema {
    schema::<HttpUri>(&[("http_upstream_type", cases![http_uri::HttpUpstreamType::Cluster(String::new())])], vec![])
}

fn authorization_response_schema() -> Schema {
    schema::<AuthorizationResponse>(
        &[],
        vec![
            ("allowed_upstream_headers", Field::Message(list_matcher_schema)),
            ("allowed_client_headers", Field::Message(list_matcher_schema)),
            ("allowed_client_headers_on_success", Field::Message(list_matcher_schema)),
        ],
    )
}

fn list_matcher_schema() -> Schema {
    schema::<ListStringMatcher>(&[], vec![("patterns", Field::Messages(string_matcher_schema))])
}

fn string_matcher_schema() -> Schema {
    use string_matcher::MatchPattern::{Contains, Custom, Exact, Prefix, SafeRegex, Suffix};
    let cases = cases![
        Exact(String::new()),
        Prefix(String::new()),
        Suffix(String::new()),
        SafeRegex(Default::default()),
        Contains(String::new()),
        Custom(Default::default())
    ];
    schema::<StringMatcher>(&[("match_pattern", cases)], vec![])
}

fn http_status_schema() -> Schema {
    schema::<HttpStatus>(&[], vec![("code", Field::Enum(|s| StatusCode::from_str_name(s).is_some()))])
}

fn connection_manager_schema() -> Schema {
    use http_connection_manager::RouteSpecifier::{Rds, RouteConfig, ScopedRoutes};
    use http_connection_manager::StripPortMode::StripAnyHostPort;
    schema::<HttpConnectionManager>(
        &[
            (
                "route_specifier",
                cases![Rds(Default::default()), RouteConfig(Default::default()), ScopedRoutes(Default::default())],
            ),
            ("strip_port_mode", cases![StripAnyHostPort(false)]),
        ],
        vec![
            (
                "path_with_escaped_slashes_action",
                Field::Enum(|s| http_connection_manager::PathWithEscapedSlashesAction::from_str_name(s).is_some()),
            ),
            ("http_filters", Field::Messages(http_filter_schema)),
        ],
    )
}

fn http_filter_schema() -> Schema {
    use http_filter::ConfigType::{ConfigDiscovery, TypedConfig};
    schema::<HttpFilter>(
        &[("config_type", cases![TypedConfig(Default::default()), ConfigDiscovery(Default::default())])],
        vec![],
    )
}

fn route_schema() -> Schema {
    use route::Action::{DirectResponse, FilterAction, NonForwardingAction, Redirect, Route as Forward};
    let cases = cases![
        Forward(Default::default()),
        Redirect(Default::default()),
        DirectResponse(Default::default()),
        FilterAction(Default::default()),
        NonForwardingAction(Default::default())
    ];
    schema::<Route>(&[("action", cases)], vec![])
}

fn cluster_schema() -> Schema {
    use cluster::ClusterDiscoveryType::{ClusterType, Type};
    schema::<Cluster>(
        &[("cluster_discovery_type", cases![Type(0), ClusterType(Default::default())])],
        vec![
            ("type", Field::Enum(|s| cluster::DiscoveryType::from_str_name(s).is_some())),
            ("load_assignment", Field::Message(load_assignment_schema)),
            ("health_checks", Field::Messages(health_check_schema)),
            ("typed_extension_protocol_options", Field::AnyMap(protocol_options_schema)),
        ],
    )
}

fn load_assignment_schema() -> Schema {
    let endpoints = || schema::<LocalityLbEndpoints>(&[], vec![("lb_endpoints", Field::Messages(lb_endpoint_schema))]);
    schema::<ClusterLoadAssignment>(&[], vec![("endpoints", Field::Messages(endpoints))])
}

fn lb_endpoint_schema() -> Schema {
    use lb_endpoint::HostIdentifier::{Endpoint as Host, EndpointName};
    schema::<LbEndpoint>(
        &[("host_identifier", cases![Host(Default::default()), EndpointName(String::new())])],
        vec![(
            "endpoint",
            Field::Message(|| schema::<Endpoint>(&[], vec![("address", Field::Message(address_schema))])),
        )],
    )
}

fn address_schema() -> Schema {
    use address::Address::{EnvoyInternalAddress, Pipe, SocketAddress as Socket};
    schema::<core::Address>(
        &[(
            "address",
            cases![Socket(Default::default()), Pipe(Default::default()), EnvoyInternalAddress(Default::default())],
        )],
        vec![("socket_address", Field::Message(socket_address_schema))],
    )
}

fn socket_address_schema() -> Schema {
    use socket_address::PortSpecifier::{NamedPort, PortValue};
    schema::<SocketAddress>(&[("port_specifier", cases![PortValue(0), NamedPort(String::new())])], vec![])
}

fn health_check_schema() -> Schema {
    use health_check::HealthChecker::{CustomHealthCheck, GrpcHealthCheck, HttpHealthCheck, TcpHealthCheck};
    let cases = cases![
        HttpHealthCheck(Default::default()),
        TcpHealthCheck(Default::default()),
        GrpcHealthCheck(Default::default()),
        CustomHealthCheck(Default::default())
    ];
    schema::<HealthCheck>(
        &[("health_checker", cases)],
        vec![("grpc_health_check", Field::Message(|| schema::<health_check::GrpcHealthCheck>(&[], vec![])))],
    )
}

fn protocol_options_schema() -> Schema {
    use http_protocol_options::UpstreamProtocolOptions::{AutoConfig, ExplicitHttpConfig, UseDownstreamProtocolConfig};
    use http_protocol_options::explicit_http_config::ProtocolConfig::{
        Http2ProtocolOptions, Http3ProtocolOptions, HttpProtocolOptions as Http1,
    };
    let explicit = || {
        let cases = cases![
            Http1(Default::default()),
            Http2ProtocolOptions(Default::default()),
            Http3ProtocolOptions(Default::default())
        ];
        schema::<http_protocol_options::ExplicitHttpConfig>(&[("protocol_config", cases)], vec![])
    };
    let cases = cases![
        ExplicitHttpConfig(Default::default()),
        UseDownstreamProtocolConfig(Default::default()),
        AutoConfig(Default::default())
    ];
    schema::<HttpProtocolOptions>(
        &[("upstream_protocol_options", cases)],
        vec![("explicit_http_config", Field::Message(explicit))],
    )
}

/// Checks `value` against `schema`; returns how many fields were checked.
fn check(value: &Value, schema: &Schema, at: &str) -> usize {
    let object = value.as_object().unwrap_or_else(|| panic!("{at}: {} is not an object", schema.name));
    let mut checked = 0;
    for (key, inner) in object {
        let here = format!("{at}.{key}");
        if key == "@type" {
            assert_eq!(inner.as_str(), Some(schema.type_url.as_str()), "{here}");
            continue;
        }
        assert!(
            schema.fields.contains(key),
            "{here}: {} has no field `{key}` (fields: {:?})",
            schema.name,
            schema.fields
        );
        checked += 1;
        match schema.nested.iter().find(|(name, _)| name == key).map(|(_, field)| *field) {
            Some(Field::Message(nested)) => checked += check(inner, &nested(), &here),
            Some(Field::Messages(nested)) => {
                for (i, item) in inner.as_array().unwrap_or_else(|| panic!("{here} is not a list")).iter().enumerate() {
                    checked += check(item, &nested(), &format!("{here}[{i}]"));
                }
            }
            Some(Field::AnyMap(nested)) => {
                let nested = nested();
                let map = inner.as_object().unwrap_or_else(|| panic!("{here} is not a map"));
                for (name, any) in map {
                    assert_eq!(name, &nested.name, "{here}");
                    checked += check(any, &nested, &format!("{here}.{name}"));
                }
            }
            Some(Field::Enum(known)) => {
                let name = inner.as_str().unwrap_or_else(|| panic!("{here} is not an enum name"));
                assert!(known(name), "{here}: `{name}` is not a value of the enum");
            }
            // A scalar, a duration, or a message this test does not open.
            None => {}
        }
    }
    checked
}

/// The ```yaml blocks of a document, parsed.
fn yaml_blocks(doc: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(format!("{}/../../docs/proxies/{doc}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let mut blocks = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "```yaml" {
            let block: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
            blocks.push(serde_yaml::from_str::<Value>(&block.join("\n")).unwrap_or_else(|e| panic!("{doc}: {e}")));
        }
    }
    blocks
}

/// The `http_filters` of a list, each checked as the message its `@type` names.
fn check_filters(filters: &Value, at: &str) -> usize {
    let mut checked = 0;
    for (i, filter) in filters.as_array().unwrap().iter().enumerate() {
        let here = format!("{at}[{i}]");
        checked += check(filter, &http_filter_schema(), &here);
        let config = &filter["typed_config"];
        let schema = match config["@type"].as_str() {
            Some(t) if t == ExtAuthz::type_url() => ext_authz_schema(),
            Some(t) if t == Router::type_url() => schema::<Router>(&[], vec![]),
            other => panic!("{here}: unexpected filter type {other:?}"),
        };
        checked += check(config, &schema, &format!("{here}.typed_config"));
    }
    checked
}

#[test]
fn the_envoy_recipes_name_only_fields_and_values_of_envoys_protos() {
    let blocks = yaml_blocks("envoy.md");
    assert_eq!(blocks.len(), 3, "the gRPC file, the HTTP filter and the HTTP route");

    // The complete gRPC configuration: the connection manager with its filters, and every cluster.
    let full = &blocks[0]["static_resources"];
    let hcm = &full["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    let mut manager = hcm.clone();
    let filters = manager.as_object_mut().unwrap().remove("http_filters").unwrap();
    let mut checked = check(&manager, &connection_manager_schema(), "hcm");
    checked += check_filters(&filters, "hcm.http_filters");
    let grpc = &filters[0]["typed_config"];
    assert_eq!(grpc["transport_api_version"], "V3");
    assert_eq!(grpc["failure_mode_allow"], false);
    assert!(grpc.get("with_request_body").is_none(), "the body is never sent");
    for (i, cluster) in full["clusters"].as_array().unwrap().iter().enumerate() {
        checked += check(cluster, &cluster_schema(), &format!("clusters[{i}]"));
    }

    // The HTTP variant's filter and its route.
    checked += check_filters(&blocks[1]["http_filters"], "http.http_filters");
    assert_eq!(blocks[1]["http_filters"][0]["typed_config"]["http_service"]["path_prefix"], "/v1/authz");
    for (i, r) in blocks[2]["routes"].as_array().unwrap().iter().enumerate() {
        checked += check(r, &route_schema(), &format!("routes[{i}]"));
    }
    assert!(checked > 60, "only {checked} fields checked");
}

/// The checker itself: a misspelt field, an unknown enum value and a wrong `@type` fail.
#[test]
fn the_checker_refuses_what_envoy_refuses() {
    let bad = [
        serde_json::json!({"transport_api_version": "V3", "failure_mode_alow": true}),
        serde_json::json!({"transport_api_version": "V4"}),
        serde_json::json!({"services": {}}),
        serde_json::json!({"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}),
        serde_json::json!({"status_on_error": {"code": "ServiceUnavailabl"}}),
        serde_json::json!({"grpc_service": {"envoy_grpc": {"cluster": "keyward"}}}),
    ];
    for value in bad {
        let refused = std::panic::catch_unwind(|| check(&value, &ext_authz_schema(), "x")).is_err();
        assert!(refused, "{value} was taken");
    }
    let good = serde_json::json!({"grpc_service": {"envoy_grpc": {"cluster_name": "keyward"}, "timeout": "0.25s"}});
    assert_eq!(check(&good, &ext_authz_schema(), "x"), 4);
}
