//! What the proxy honours, in one place (STYLE habit 3, orion's `unsupported_field!`):
//!
//! * per message (full protobuf name), the fields we implement — they are walked and compiled — and
//!   the fields we know to be harmless — accepted and ignored, each with the reason;
//! * per extension type (the `@type` of an Any, or the `type_url` inside a `TypedStruct`), whether we
//!   implement it and where it may appear;
//! * per enum field, the values we implement when not every value is.
//!
//! Anything else that is set is rejected by [`super::allowlist`] with its JSON path. A message that
//! has no entry here accepts no set field at all (an empty `{}` is fine).

use std::{collections::HashMap, sync::OnceLock};

/// How we treat a field that is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// Compiled into our types and honoured (or checked) by the proxy; walked recursively.
    Implemented,
    /// Accepted and ignored on purpose; the reason says why that is safe. Not walked.
    Harmless(&'static str),
}

/// One field of a message.
#[derive(Debug, Clone, Copy)]
pub struct FieldRule {
    /// The proto field name (snake_case).
    pub name: &'static str,
    /// How we treat it.
    pub support: Support,
}

/// The fields of one message we accept.
#[derive(Debug, Clone, Copy)]
pub struct MessageRule {
    /// Full protobuf name (`envoy.config.listener.v3.Listener`) or, for Istio configs that only
    /// exist as a `TypedStruct`, the `type_url` name; then `fields` are the JSON keys.
    pub message: &'static str,
    /// Accepted fields.
    pub fields: &'static [FieldRule],
    /// Field numbers absent from our schema are skipped instead of rejected (for messages whose
    /// .proto we keep as a subset on purpose, like Istio's `Workload`).
    pub ignore_unknown_numbers: bool,
}

impl MessageRule {
    /// The rule for field `name`, if accepted.
    pub fn field(&self, name: &str) -> Option<Support> {
        self.fields
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.support)
    }
}

/// Where an extension type may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtensionKind {
    /// `Listener.listener_filters[].typed_config`.
    ListenerFilter,
    /// `FilterChain.filters[].typed_config`.
    NetworkFilter,
    /// `HttpConnectionManager.http_filters[].typed_config`.
    HttpFilter,
    /// `typed_per_filter_config` values.
    PerRouteFilter,
    /// `transport_socket.typed_config`.
    TransportSocket,
    /// `Cluster.typed_extension_protocol_options` values.
    ProtocolOptions,
    /// Matcher inputs (`xds.type.matcher.v3.Matcher.MatcherTree.input`).
    MatchInput,
    /// Matcher actions (`on_match.action`).
    MatchAction,
    /// Custom matchers (`MatcherTree.custom_match`).
    CustomMatcher,
    /// `RetryPolicy.retry_host_predicate`.
    RetryHostPredicate,
    /// `RetryPolicy.retry_priority`.
    RetryPriority,
    /// Path matchers (`envoy.path.match`: RBAC `Permission.uri_template`).
    PathMatcher,
    /// `HttpConnectionManager.request_id_extension`.
    RequestId,
    /// `access_log[].typed_config`.
    AccessLogger,
    /// `Compressor.compressor_library`.
    Compression,
    /// `Bootstrap.bootstrap_extensions`.
    BootstrapExtension,
    /// `OverloadManager.resource_monitors`.
    ResourceMonitor,
    /// `Cluster.typed_dns_resolver_config.typed_config`.
    DnsResolver,
    /// `udpa.type.v1.TypedStruct` / `xds.type.v3.TypedStruct`: a wrapper, judged by its inner type.
    Wrapper,
}

/// One extension type.
#[derive(Debug, Clone, Copy)]
pub struct ExtensionRule {
    /// Full message name (the part of the type URL after the last `/`).
    pub type_name: &'static str,
    /// Where it may appear.
    pub kind: ExtensionKind,
    /// Implemented or harmless.
    pub support: Support,
    /// Istio sends it only as a `TypedStruct` and we read the Struct by keys (no descriptor); its
    /// keys are listed in [`MESSAGES`] under `type_name`.
    pub struct_only: bool,
}

/// Enum values we implement for one field (fields without an entry accept every value).
#[derive(Debug, Clone, Copy)]
pub struct EnumRule {
    /// Message full name.
    pub message: &'static str,
    /// Field name.
    pub field: &'static str,
    /// Implemented value names.
    pub values: &'static [&'static str],
}

const fn imp(name: &'static str) -> FieldRule {
    FieldRule {
        name,
        support: Support::Implemented,
    }
}

const fn ok(name: &'static str, why: &'static str) -> FieldRule {
    FieldRule {
        name,
        support: Support::Harmless(why),
    }
}

const fn msg(message: &'static str, fields: &'static [FieldRule]) -> MessageRule {
    MessageRule {
        message,
        fields,
        ignore_unknown_numbers: false,
    }
}

const fn ext(type_name: &'static str, kind: ExtensionKind) -> ExtensionRule {
    ExtensionRule {
        type_name,
        kind,
        support: Support::Implemented,
        struct_only: false,
    }
}

const fn ext_struct(type_name: &'static str, kind: ExtensionKind) -> ExtensionRule {
    ExtensionRule {
        type_name,
        kind,
        support: Support::Implemented,
        struct_only: true,
    }
}

const fn enums(
    message: &'static str,
    field: &'static str,
    values: &'static [&'static str],
) -> EnumRule {
    EnumRule {
        message,
        field,
        values,
    }
}

// Reasons shared by several fields.
const STATS_ONLY: &str = "stats naming/emission only; traffic is handled the same";
const OPAQUE_METADATA: &str =
    "opaque metadata read only by extensions we do not run; it changes no behaviour here";
const NO_RUNTIME: &str = "names a runtime key; there is no runtime layer, so the configured default \
                          value always applies";
const NO_TRACING: &str = "tracing spans are not emitted (not implemented); requests are proxied \
                          the same and trace headers pass through untouched";
const ENVOY_UNIMPLEMENTED: &str = "marked [#not-implemented-hide:] in Envoy's API: Envoy accepts \
                                   and ignores it too";
const NO_ACTIVE_HC: &str = "only consulted by active health checking, which no cluster can enable (health_checks is rejected)";

/// Per message: the fields we accept.
pub static MESSAGES: &[MessageRule] = &[
    // ---------------------------------------------------------------- listeners
    msg(
        "envoy.config.listener.v3.Listener",
        &[
            imp("name"),
            imp("address"),
            imp("additional_addresses"),
            imp("filter_chains"),
            imp("default_filter_chain"),
            imp("filter_chain_matcher"),
            imp("listener_filters"),
            imp("listener_filters_timeout"),
            imp("continue_on_listener_filters_timeout"),
            imp("use_original_dst"),
            imp("internal_listener"),
            imp("per_connection_buffer_limit_bytes"),
            imp("access_log"),
            imp("ignore_global_conn_limit"),
            ok(
                "traffic_direction",
                "a direction hint for Envoy's tracing and stats; it does not change how connections are served",
            ),
            ok(
                "connection_balance_config",
                "how Envoy spreads accepted sockets over worker threads; the tokio runtime schedules connections itself",
            ),
            ok("stat_prefix", STATS_ONLY),
            ok("metadata", OPAQUE_METADATA),
            ok(
                "bypass_overload_manager",
                "no overload actions are implemented, so there is nothing to bypass",
            ),
        ],
    ),
    msg(
        "envoy.config.listener.v3.AdditionalAddress",
        &[imp("address")],
    ),
    msg(
        "envoy.config.listener.v3.FilterChain",
        &[
            imp("filter_chain_match"),
            imp("filters"),
            imp("transport_socket"),
            imp("transport_socket_connect_timeout"),
            imp("name"),
            ok("metadata", OPAQUE_METADATA),
        ],
    ),
    msg(
        "envoy.config.listener.v3.FilterChainMatch",
        &[
            imp("destination_port"),
            imp("prefix_ranges"),
            imp("source_type"),
            imp("source_prefix_ranges"),
            imp("direct_source_prefix_ranges"),
            imp("source_ports"),
            imp("server_names"),
            imp("transport_protocol"),
            imp("application_protocols"),
        ],
    ),
    msg(
        "envoy.config.listener.v3.Filter",
        &[imp("name"), imp("typed_config")],
    ),
    msg(
        "envoy.config.listener.v3.ListenerFilter",
        &[imp("name"), imp("typed_config"), imp("filter_disabled")],
    ),
    msg(
        "envoy.config.listener.v3.ListenerFilterChainMatchPredicate",
        &[
            imp("or_match"),
            imp("and_match"),
            imp("not_match"),
            imp("any_match"),
            imp("destination_port_range"),
        ],
    ),
    msg(
        "envoy.config.listener.v3.ListenerFilterChainMatchPredicate.MatchSet",
        &[imp("rules")],
    ),
    msg(
        "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
        &[
            imp("initial_read_buffer_size"),
            imp("max_client_hello_size"),
        ],
    ),
    // ---------------------------------------------------------------- core
    msg(
        "envoy.config.core.v3.Address",
        &[
            imp("socket_address"),
            imp("pipe"),
            imp("envoy_internal_address"),
        ],
    ),
    msg(
        "envoy.config.core.v3.SocketAddress",
        &[
            imp("protocol"),
            imp("address"),
            imp("port_value"),
            imp("ipv4_compat"),
        ],
    ),
    msg(
        "envoy.config.core.v3.EnvoyInternalAddress",
        &[imp("server_listener_name"), imp("endpoint_id")],
    ),
    msg("envoy.config.core.v3.Pipe", &[imp("path")]),
    msg(
        "envoy.config.core.v3.TransportSocket",
        &[imp("name"), imp("typed_config")],
    ),
    msg(
        "envoy.config.core.v3.CidrRange",
        &[imp("address_prefix"), imp("prefix_len")],
    ),
    msg(
        "xds.core.v3.CidrRange",
        &[imp("address_prefix"), imp("prefix_len")],
    ),
    msg("envoy.config.core.v3.Metadata", &[imp("filter_metadata")]),
    msg(
        "envoy.config.core.v3.TypedExtensionConfig",
        &[imp("name"), imp("typed_config")],
    ),
    msg(
        "xds.core.v3.TypedExtensionConfig",
        &[imp("name"), imp("typed_config")],
    ),
    msg(
        "envoy.config.core.v3.Locality",
        &[imp("region"), imp("zone"), imp("sub_zone")],
    ),
    msg(
        "envoy.config.core.v3.DataSource",
        &[imp("inline_string"), imp("inline_bytes")],
    ),
    msg(
        "envoy.config.core.v3.HeaderValue",
        &[imp("key"), imp("value"), imp("raw_value")],
    ),
    msg(
        "envoy.config.core.v3.HeaderValueOption",
        &[
            imp("header"),
            imp("append"),
            imp("append_action"),
            imp("keep_empty_value"),
        ],
    ),
    msg(
        "envoy.config.core.v3.RuntimeFractionalPercent",
        &[imp("default_value"), ok("runtime_key", NO_RUNTIME)],
    ),
    msg(
        "envoy.config.core.v3.RuntimeFeatureFlag",
        &[imp("default_value"), ok("runtime_key", NO_RUNTIME)],
    ),
    msg(
        "envoy.type.v3.FractionalPercent",
        &[imp("numerator"), imp("denominator")],
    ),
    msg("envoy.type.v3.Percent", &[imp("value")]),
    msg("envoy.type.v3.Int32Range", &[imp("start"), imp("end")]),
    msg("envoy.type.v3.Int64Range", &[imp("start"), imp("end")]),
    msg("envoy.type.v3.DoubleRange", &[imp("start"), imp("end")]),
    msg("envoy.type.v3.HttpStatus", &[imp("code")]),
    msg(
        "envoy.type.v3.TokenBucket",
        &[
            imp("max_tokens"),
            imp("tokens_per_fill"),
            imp("fill_interval"),
        ],
    ),
    msg(
        "envoy.type.metadata.v3.MetadataKey",
        &[imp("key"), imp("path")],
    ),
    msg(
        "envoy.type.metadata.v3.MetadataKey.PathSegment",
        &[imp("key")],
    ),
    msg(
        "envoy.type.metadata.v3.MetadataKind",
        &[imp("host"), imp("cluster")],
    ),
    msg(
        "envoy.config.core.v3.ConfigSource",
        &[
            imp("ads"),
            imp("api_config_source"),
            imp("initial_fetch_timeout"),
            imp("resource_api_version"),
        ],
    ),
    msg(
        "envoy.config.core.v3.ApiConfigSource",
        &[
            imp("api_type"),
            imp("grpc_services"),
            imp("set_node_on_first_message_only"),
            imp("transport_api_version"),
        ],
    ),
    msg(
        "envoy.config.core.v3.GrpcService",
        &[imp("envoy_grpc"), imp("timeout")],
    ),
    msg(
        "envoy.config.core.v3.GrpcService.EnvoyGrpc",
        &[imp("cluster_name"), imp("authority")],
    ),
    msg(
        "envoy.config.core.v3.SubstitutionFormatString",
        &[
            imp("text_format"),
            imp("text_format_source"),
            imp("json_format"),
            imp("omit_empty_values"),
            ok(
                "content_type",
                "the Content-Type of local replies formatted with this string; we format no local reply bodies with it",
            ),
        ],
    ),
    // ---------------------------------------------------------------- xDS matcher API
    msg(
        "xds.type.matcher.v3.Matcher",
        &[imp("matcher_tree"), imp("on_no_match")],
    ),
    msg(
        "xds.type.matcher.v3.Matcher.MatcherTree",
        &[
            imp("input"),
            imp("exact_match_map"),
            imp("prefix_match_map"),
            imp("custom_match"),
        ],
    ),
    msg(
        "xds.type.matcher.v3.Matcher.MatcherTree.MatchMap",
        &[imp("map")],
    ),
    msg(
        "xds.type.matcher.v3.Matcher.OnMatch",
        &[imp("matcher"), imp("action")],
    ),
    msg("xds.type.matcher.v3.IPMatcher", &[imp("range_matchers")]),
    msg(
        "xds.type.matcher.v3.IPMatcher.IPRangeMatcher",
        &[imp("ranges"), imp("on_match"), imp("exclusive")],
    ),
    msg(
        "envoy.extensions.matching.common_inputs.network.v3.FilterStateInput",
        &[imp("key")],
    ),
    // ---------------------------------------------------------------- string/header matchers
    msg(
        "envoy.type.matcher.v3.StringMatcher",
        &[
            imp("exact"),
            imp("prefix"),
            imp("suffix"),
            imp("contains"),
            imp("safe_regex"),
            imp("ignore_case"),
        ],
    ),
    msg(
        "envoy.type.matcher.v3.RegexMatcher",
        &[
            imp("regex"),
            ok(
                "google_re2",
                "selects the RE2 engine; we always compile with the regex crate, whose syntax is RE2's",
            ),
        ],
    ),
    msg(
        "envoy.type.matcher.v3.RegexMatchAndSubstitute",
        &[imp("pattern"), imp("substitution")],
    ),
    msg(
        "envoy.type.matcher.v3.ListStringMatcher",
        &[imp("patterns")],
    ),
    msg(
        "envoy.config.route.v3.HeaderMatcher",
        &[
            imp("name"),
            imp("exact_match"),
            imp("safe_regex_match"),
            imp("range_match"),
            imp("present_match"),
            imp("prefix_match"),
            imp("suffix_match"),
            imp("contains_match"),
            imp("string_match"),
            imp("invert_match"),
            imp("treat_missing_header_as_empty"),
        ],
    ),
    msg(
        "envoy.config.route.v3.QueryParameterMatcher",
        &[imp("name"), imp("string_match"), imp("present_match")],
    ),
    msg("envoy.type.matcher.v3.PathMatcher", &[imp("path")]),
    msg(
        "envoy.type.matcher.v3.MetadataMatcher",
        &[imp("filter"), imp("path"), imp("value"), imp("invert")],
    ),
    msg(
        "envoy.type.matcher.v3.MetadataMatcher.PathSegment",
        &[imp("key")],
    ),
    msg(
        "envoy.type.matcher.v3.ValueMatcher",
        &[
            imp("null_match"),
            imp("double_match"),
            imp("string_match"),
            imp("bool_match"),
            imp("present_match"),
            imp("list_match"),
            imp("or_match"),
        ],
    ),
    msg("envoy.type.matcher.v3.ListMatcher", &[imp("one_of")]),
    msg("envoy.type.matcher.v3.OrMatcher", &[imp("value_matchers")]),
    msg(
        "envoy.type.matcher.v3.DoubleMatcher",
        &[imp("range"), imp("exact")],
    ),
    msg(
        "envoy.type.matcher.v3.FilterStateMatcher",
        &[imp("key"), imp("string_match")],
    ),
    // ---------------------------------------------------------------- HTTP connection manager
    msg(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        &[
            imp("codec_type"),
            imp("stat_prefix"),
            imp("rds"),
            imp("route_config"),
            imp("http_filters"),
            imp("add_user_agent"),
            imp("http_protocol_options"),
            imp("http2_protocol_options"),
            imp("common_http_protocol_options"),
            imp("server_name"),
            imp("server_header_transformation"),
            // `drain_timeout` and `delayed_close_timeout` are not accepted: hyper's graceful
            // shutdown sends its final GOAWAY one PING round trip after the first (not after
            // `drain_timeout`), and closes the socket without waiting for the peer's FIN.
            imp("access_log"),
            imp("use_remote_address"),
            imp("xff_num_trusted_hops"),
            imp("skip_xff_append"),
            imp("via"),
            imp("internal_address_config"),
            imp("generate_request_id"),
            imp("preserve_external_request_id"),
            imp("always_set_request_id_in_response"),
            imp("request_id_extension"),
            imp("forward_client_cert_details"),
            imp("set_current_client_cert_details"),
            imp("proxy_100_continue"),
            imp("upgrade_configs"),
            imp("stream_idle_timeout"),
            imp("request_timeout"),
            imp("request_headers_timeout"),
            imp("max_request_headers_kb"),
            imp("normalize_path"),
            imp("merge_slashes"),
            imp("path_with_escaped_slashes_action"),
            imp("strip_matching_host_port"),
            imp("strip_any_host_port"),
            imp("strip_trailing_host_dot"),
            imp("stream_error_on_invalid_http_message"),
            imp("tracing"),
        ],
    ),
    // Sampling settings without a tracer change nothing (no spans exist to sample); a `provider`
    // (a tracer: OpenTelemetry, Zipkin, …) is not accepted until spans are emitted, so an operator
    // who configures one sees the NACK instead of missing traces.
    msg(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.Tracing",
        &[
            ok("client_sampling", NO_TRACING),
            ok("random_sampling", NO_TRACING),
            ok("overall_sampling", NO_TRACING),
            ok("verbose", NO_TRACING),
            ok("max_path_tag_length", NO_TRACING),
            ok("custom_tags", NO_TRACING),
            ok("spawn_upstream_span", NO_TRACING),
        ],
    ),
    msg(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter",
        &[
            imp("name"),
            imp("typed_config"),
            imp("is_optional"),
            imp("disabled"),
        ],
    ),
    msg(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.UpgradeConfig",
        &[imp("upgrade_type"), imp("enabled")],
    ),
    msg(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.SetCurrentClientCertDetails",
        &[
            imp("subject"),
            imp("cert"),
            imp("chain"),
            imp("dns"),
            imp("uri"),
        ],
    ),
    msg(
        "envoy.extensions.filters.network.http_connection_manager.v3.Rds",
        &[imp("config_source"), imp("route_config_name")],
    ),
    msg(
        "envoy.extensions.filters.network.http_connection_manager.v3.RequestIDExtension",
        &[imp("typed_config")],
    ),
    msg(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.InternalAddressConfig",
        &[imp("unix_sockets"), imp("cidr_ranges")],
    ),
    msg(
        "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
        &[
            imp("pack_trace_reason"),
            ok("use_request_id_for_trace_sampling", NO_TRACING),
        ],
    ),
    msg(
        "envoy.config.core.v3.Http1ProtocolOptions",
        &[
            imp("allow_absolute_url"),
            imp("accept_http_10"),
            imp("default_host_for_http_10"),
            imp("enable_trailers"),
            imp("allow_chunked_length"),
            imp("override_stream_error_on_invalid_http_message"),
        ],
    ),
    msg(
        "envoy.config.core.v3.Http2ProtocolOptions",
        &[
            imp("hpack_table_size"),
            imp("max_concurrent_streams"),
            imp("initial_stream_window_size"),
            imp("initial_connection_window_size"),
            imp("allow_connect"),
            imp("connection_keepalive"),
            imp("override_stream_error_on_invalid_http_message"),
        ],
    ),
    msg(
        "envoy.config.core.v3.KeepaliveSettings",
        &[imp("interval"), imp("timeout")],
    ),
    msg(
        "envoy.config.core.v3.HttpProtocolOptions",
        &[
            imp("idle_timeout"),
            imp("max_connection_duration"),
            imp("max_headers_count"),
            imp("max_response_headers_kb"),
            imp("max_stream_duration"),
            imp("headers_with_underscores_action"),
            imp("max_requests_per_connection"),
        ],
    ),
    msg(
        "envoy.config.core.v3.UpstreamHttpProtocolOptions",
        &[
            imp("auto_sni"),
            imp("auto_san_validation"),
            imp("override_auto_sni_header"),
        ],
    ),
    // ---------------------------------------------------------------- routes
    msg(
        "envoy.config.route.v3.RouteConfiguration",
        &[
            imp("name"),
            imp("virtual_hosts"),
            imp("internal_only_headers"),
            imp("response_headers_to_add"),
            imp("response_headers_to_remove"),
            imp("request_headers_to_add"),
            imp("request_headers_to_remove"),
            imp("most_specific_header_mutations_wins"),
            imp("validate_clusters"),
            imp("max_direct_response_body_size_bytes"),
            imp("ignore_port_in_host_matching"),
            imp("ignore_path_parameters_in_path_matching"),
            imp("typed_per_filter_config"),
            imp("request_mirror_policies"),
            ok("metadata", OPAQUE_METADATA),
        ],
    ),
    msg(
        "envoy.config.route.v3.VirtualHost",
        &[
            imp("name"),
            imp("domains"),
            imp("routes"),
            imp("request_headers_to_add"),
            imp("request_headers_to_remove"),
            imp("response_headers_to_add"),
            imp("response_headers_to_remove"),
            imp("include_request_attempt_count"),
            imp("include_attempt_count_in_response"),
            imp("typed_per_filter_config"),
            imp("retry_policy"),
            imp("request_mirror_policies"),
            imp("cors"),
            ok("metadata", OPAQUE_METADATA),
        ],
    ),
    msg(
        "envoy.config.route.v3.Route",
        &[
            imp("name"),
            imp("match"),
            imp("route"),
            imp("redirect"),
            imp("direct_response"),
            imp("request_headers_to_add"),
            imp("request_headers_to_remove"),
            imp("response_headers_to_add"),
            imp("response_headers_to_remove"),
            imp("typed_per_filter_config"),
            ok("metadata", OPAQUE_METADATA),
            ok(
                "decorator",
                "names the tracing span of the route; tracing spans are not emitted",
            ),
            ok("tracing", NO_TRACING),
            ok("stat_prefix", STATS_ONLY),
        ],
    ),
    msg(
        "envoy.config.route.v3.RouteMatch",
        &[
            imp("prefix"),
            imp("path"),
            imp("safe_regex"),
            imp("connect_matcher"),
            imp("path_separated_prefix"),
            imp("case_sensitive"),
            imp("runtime_fraction"),
            imp("headers"),
            imp("query_parameters"),
            imp("grpc"),
            imp("tls_context"),
        ],
    ),
    msg(
        "envoy.config.route.v3.RouteMatch.TlsContextMatchOptions",
        &[imp("presented"), imp("validated")],
    ),
    msg(
        "envoy.config.route.v3.RouteAction",
        &[
            imp("cluster"),
            imp("cluster_header"),
            imp("weighted_clusters"),
            imp("cluster_not_found_response_code"),
            imp("prefix_rewrite"),
            imp("regex_rewrite"),
            imp("host_rewrite_literal"),
            imp("auto_host_rewrite"),
            imp("host_rewrite_header"),
            imp("host_rewrite_path_regex"),
            imp("append_x_forwarded_host"),
            imp("timeout"),
            imp("idle_timeout"),
            imp("retry_policy"),
            imp("priority"),
            imp("hash_policy"),
            imp("upgrade_configs"),
            imp("max_stream_duration"),
            imp("max_grpc_timeout"),
            imp("grpc_timeout_offset"),
            imp("request_mirror_policies"),
            imp("cors"),
        ],
    ),
    msg(
        "envoy.config.route.v3.CorsPolicy",
        &[
            imp("allow_origin_string_match"),
            imp("allow_methods"),
            imp("allow_headers"),
            imp("expose_headers"),
            imp("max_age"),
            imp("allow_credentials"),
            imp("filter_enabled"),
            imp("shadow_enabled"),
            imp("allow_private_network_access"),
            imp("forward_not_matching_preflights"),
        ],
    ),
    msg(
        "envoy.config.route.v3.WeightedCluster",
        &[
            imp("clusters"),
            imp("total_weight"),
            imp("header_name"),
            imp("use_hash_policy"),
            ok("runtime_key_prefix", NO_RUNTIME),
        ],
    ),
    msg(
        "envoy.config.route.v3.WeightedCluster.ClusterWeight",
        &[
            imp("name"),
            imp("cluster_header"),
            imp("weight"),
            imp("request_headers_to_add"),
            imp("request_headers_to_remove"),
            imp("response_headers_to_add"),
            imp("response_headers_to_remove"),
            imp("host_rewrite_literal"),
        ],
    ),
    msg(
        "envoy.config.route.v3.RetryPolicy",
        &[
            imp("retry_on"),
            imp("num_retries"),
            imp("per_try_timeout"),
            imp("per_try_idle_timeout"),
            imp("retry_host_predicate"),
            ok(
                "host_selection_retry_max_attempts",
                "bounds how often Envoy re-picks while previous_hosts rejects the host; our \
                 balancer leaves tried hosts out in a single pick whenever another host is \
                 available, the result those re-picks approach, so no bound is needed",
            ),
            imp("retry_priority"),
            imp("retriable_status_codes"),
            imp("retry_back_off"),
            imp("retriable_headers"),
            imp("retriable_request_headers"),
        ],
    ),
    msg(
        "envoy.config.route.v3.RetryPolicy.RetryPriority",
        &[imp("name"), imp("typed_config")],
    ),
    msg(
        "envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
        &[imp("update_frequency")],
    ),
    msg(
        "envoy.config.route.v3.RetryPolicy.RetryBackOff",
        &[imp("base_interval"), imp("max_interval")],
    ),
    msg(
        "envoy.config.route.v3.RetryPolicy.RetryHostPredicate",
        &[imp("name"), imp("typed_config")],
    ),
    msg(
        "envoy.config.route.v3.RouteAction.RequestMirrorPolicy",
        &[
            imp("cluster"),
            imp("cluster_header"),
            imp("runtime_fraction"),
            imp("disable_shadow_host_suffix_append"),
            imp("host_rewrite_literal"),
            ok("trace_sampled", NO_TRACING),
        ],
    ),
    msg(
        "envoy.config.route.v3.RouteAction.HashPolicy",
        &[
            imp("header"),
            imp("cookie"),
            imp("connection_properties"),
            imp("query_parameter"),
            imp("filter_state"),
            imp("terminal"),
        ],
    ),
    msg(
        "envoy.config.route.v3.RouteAction.HashPolicy.Header",
        &[imp("header_name"), imp("regex_rewrite")],
    ),
    msg(
        "envoy.config.route.v3.RouteAction.HashPolicy.Cookie",
        &[imp("name"), imp("ttl"), imp("path"), imp("attributes")],
    ),
    msg(
        "envoy.config.route.v3.RouteAction.HashPolicy.CookieAttribute",
        &[imp("name"), imp("value")],
    ),
    msg(
        "envoy.config.route.v3.RouteAction.HashPolicy.ConnectionProperties",
        &[imp("source_ip")],
    ),
    msg(
        "envoy.config.route.v3.RouteAction.HashPolicy.QueryParameter",
        &[imp("name")],
    ),
    msg(
        "envoy.config.route.v3.RouteAction.HashPolicy.FilterState",
        &[imp("key")],
    ),
    msg(
        "envoy.config.route.v3.RouteAction.UpgradeConfig",
        &[imp("upgrade_type"), imp("enabled"), imp("connect_config")],
    ),
    msg(
        "envoy.config.route.v3.RouteAction.UpgradeConfig.ConnectConfig",
        &[imp("allow_post")],
    ),
    msg(
        "envoy.config.route.v3.RouteAction.MaxStreamDuration",
        &[
            imp("max_stream_duration"),
            imp("grpc_timeout_header_max"),
            imp("grpc_timeout_header_offset"),
        ],
    ),
    msg(
        "envoy.config.route.v3.RedirectAction",
        &[
            imp("scheme_redirect"),
            imp("https_redirect"),
            imp("host_redirect"),
            imp("port_redirect"),
            imp("path_redirect"),
            imp("prefix_rewrite"),
            imp("regex_rewrite"),
            imp("response_code"),
            imp("strip_query"),
        ],
    ),
    msg(
        "envoy.config.route.v3.DirectResponseAction",
        &[imp("status"), imp("body")],
    ),
    msg(
        "envoy.config.route.v3.FilterConfig",
        &[imp("config"), imp("is_optional"), imp("disabled")],
    ),
    // ---------------------------------------------------------------- network filters
    msg(
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        &[
            imp("stat_prefix"),
            imp("cluster"),
            imp("weighted_clusters"),
            imp("idle_timeout"),
            ok("downstream_idle_timeout", ENVOY_UNIMPLEMENTED),
            ok("upstream_idle_timeout", ENVOY_UNIMPLEMENTED),
            imp("access_log"),
            imp("max_connect_attempts"),
            imp("hash_policy"),
            imp("tunneling_config"),
            imp("max_downstream_connection_duration"),
        ],
    ),
    msg(
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.WeightedCluster",
        &[imp("clusters")],
    ),
    msg(
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.WeightedCluster.ClusterWeight",
        &[imp("name"), imp("weight")],
    ),
    msg(
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.TunnelingConfig",
        &[
            imp("hostname"),
            imp("use_post"),
            imp("post_path"),
            imp("headers_to_add"),
            imp("propagate_response_headers"),
            imp("propagate_response_trailers"),
        ],
    ),
    msg(
        "envoy.type.v3.HashPolicy",
        &[imp("source_ip"), imp("filter_state")],
    ),
    msg("envoy.type.v3.HashPolicy.FilterState", &[imp("key")]),
    msg(
        "envoy.extensions.filters.network.set_filter_state.v3.Config",
        &[imp("on_new_connection")],
    ),
    msg(
        "envoy.extensions.filters.http.set_filter_state.v3.Config",
        &[imp("on_request_headers")],
    ),
    msg(
        "envoy.extensions.filters.common.set_filter_state.v3.FilterStateValue",
        &[
            imp("object_key"),
            imp("factory_key"),
            imp("format_string"),
            imp("read_only"),
            imp("shared_with_upstream"),
            imp("skip_if_empty"),
        ],
    ),
    msg(
        "envoy.extensions.filters.network.rbac.v3.RBAC",
        &[
            imp("rules"),
            imp("shadow_rules"),
            imp("enforcement_type"),
            imp("delay_deny"),
            ok("stat_prefix", STATS_ONLY),
            ok("shadow_rules_stat_prefix", STATS_ONLY),
        ],
    ),
    msg(
        "envoy.extensions.filters.http.rbac.v3.RBAC",
        &[
            imp("rules"),
            imp("shadow_rules"),
            ok("rules_stat_prefix", STATS_ONLY),
            ok("shadow_rules_stat_prefix", STATS_ONLY),
            ok("track_per_rule_stats", STATS_ONLY),
        ],
    ),
    msg(
        "envoy.extensions.filters.http.rbac.v3.RBACPerRoute",
        &[imp("rbac")],
    ),
    msg(
        "envoy.config.rbac.v3.RBAC",
        &[imp("action"), imp("policies")],
    ),
    msg(
        "envoy.config.rbac.v3.Policy",
        &[imp("permissions"), imp("principals")],
    ),
    msg(
        "envoy.config.rbac.v3.Permission",
        &[
            imp("and_rules"),
            imp("or_rules"),
            imp("any"),
            imp("header"),
            imp("url_path"),
            imp("destination_ip"),
            imp("destination_port"),
            imp("destination_port_range"),
            imp("metadata"),
            imp("not_rule"),
            imp("requested_server_name"),
            imp("uri_template"),
        ],
    ),
    msg("envoy.config.rbac.v3.Permission.Set", &[imp("rules")]),
    msg(
        "envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig",
        &[imp("path_template")],
    ),
    msg(
        "envoy.config.rbac.v3.Principal",
        &[
            imp("and_ids"),
            imp("or_ids"),
            imp("any"),
            imp("authenticated"),
            imp("source_ip"),
            imp("direct_remote_ip"),
            imp("remote_ip"),
            imp("header"),
            imp("url_path"),
            imp("metadata"),
            imp("filter_state"),
            imp("not_id"),
        ],
    ),
    msg("envoy.config.rbac.v3.Principal.Set", &[imp("ids")]),
    msg(
        "envoy.config.rbac.v3.Principal.Authenticated",
        &[imp("principal_name")],
    ),
    // ---------------------------------------------------------------- Istio configs
    msg(
        "stats.PluginConfig",
        &[
            imp("reporter"),
            imp("disable_host_header_fallback"),
            imp("tcp_reporting_duration"),
            imp("metrics"),
            imp("definitions"),
            imp("stat_prefix"),
            imp("rotation_interval"),
            imp("graceful_deletion_interval"),
            ok("debug", "extra debug logging in Istio's filter only"),
            ok(
                "max_peer_cache_size",
                "sizes Istio's peer cache; our peer lookups go to the WDS snapshot",
            ),
            ok(
                "field_separator",
                "separator of Istio's internal stat name encoding; we emit Prometheus labels directly",
            ),
            ok(
                "value_separator",
                "separator of Istio's internal stat name encoding; we emit Prometheus labels directly",
            ),
        ],
    ),
    msg(
        "stats.MetricConfig",
        &[
            imp("name"),
            imp("tags_to_remove"),
            imp("drop"),
            imp("dimensions"),
        ],
    ),
    msg(
        "stats.MetricDefinition",
        &[imp("name"), imp("value"), imp("type")],
    ),
    // Struct-only Istio configs: the JSON keys we accept.
    msg(
        "io.istio.http.peer_metadata.Config",
        &[
            imp("downstream_discovery"),
            imp("upstream_discovery"),
            imp("downstream_propagation"),
            imp("upstream_propagation"),
            imp("shared_with_upstream"),
        ],
    ),
    msg(
        "envoy.tcp.metadataexchange.config.MetadataExchange",
        &[imp("protocol"), imp("enable_discovery")],
    ),
    msg(
        "envoy.extensions.network_filters.peer_metadata.Config",
        &[imp("baggage_key")],
    ),
    // ---------------------------------------------------------------- HTTP filters
    msg(
        "envoy.extensions.filters.http.router.v3.Router",
        &[
            imp("suppress_envoy_headers"),
            imp("strict_check_headers"),
            imp("respect_expected_rq_timeout"),
            ok("dynamic_stats", STATS_ONLY),
            ok("suppress_grpc_request_failure_code_stats", STATS_ONLY),
            ok("start_child_span", NO_TRACING),
        ],
    ),
    msg(
        "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
        &[
            imp("emit_filter_state"),
            imp("stats_for_all_methods"),
            imp("enable_upstream_stats"),
            imp("replace_dots_in_grpc_service_name"),
        ],
    ),
    msg(
        "envoy.extensions.filters.http.fault.v3.HTTPFault",
        &[
            imp("delay"),
            imp("abort"),
            imp("upstream_cluster"),
            imp("headers"),
            imp("downstream_nodes"),
            imp("max_active_faults"),
            ok("delay_percent_runtime", NO_RUNTIME),
            ok("abort_percent_runtime", NO_RUNTIME),
            ok("delay_duration_runtime", NO_RUNTIME),
            ok("abort_http_status_runtime", NO_RUNTIME),
            ok("max_active_faults_runtime", NO_RUNTIME),
            ok("response_rate_limit_percent_runtime", NO_RUNTIME),
            ok("abort_grpc_status_runtime", NO_RUNTIME),
            ok("disable_downstream_cluster_stats", STATS_ONLY),
        ],
    ),
    msg(
        "envoy.extensions.filters.common.fault.v3.FaultDelay",
        &[imp("fixed_delay"), imp("header_delay"), imp("percentage")],
    ),
    msg(
        "envoy.extensions.filters.http.fault.v3.FaultAbort",
        &[
            imp("http_status"),
            imp("grpc_status"),
            imp("header_abort"),
            imp("percentage"),
        ],
    ),
    msg(
        "envoy.extensions.filters.http.cors.v3.CorsPolicy",
        &[
            imp("allow_origin_string_match"),
            imp("allow_methods"),
            imp("allow_headers"),
            imp("expose_headers"),
            imp("max_age"),
            imp("allow_credentials"),
            imp("filter_enabled"),
            imp("allow_private_network_access"),
            imp("forward_not_matching_preflights"),
            imp("shadow_enabled"),
        ],
    ),
    msg(
        "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        &[
            imp("stat_prefix"),
            imp("status"),
            imp("token_bucket"),
            imp("filter_enabled"),
            imp("filter_enforced"),
            imp("request_headers_to_add_when_not_enforced"),
            imp("response_headers_to_add"),
            imp("local_rate_limit_per_downstream_connection"),
            imp("enable_x_ratelimit_headers"),
            imp("enable_retry_after_header"),
            ok(
                "always_consume_default_token_bucket",
                "chooses between descriptor buckets and the default one; descriptors are \
                 rejected, so the default bucket is always the one consumed",
            ),
        ],
    ),
    msg(
        "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        &[
            imp("providers"),
            imp("rules"),
            imp("requirement_map"),
            imp("bypass_cors_preflight"),
            imp("strip_failure_response"),
            imp("stat_prefix"),
        ],
    ),
    msg(
        "envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig",
        &[imp("disabled"), imp("requirement_name")],
    ),
    msg(
        "envoy.extensions.filters.http.jwt_authn.v3.JwtProvider",
        &[
            imp("issuer"),
            imp("audiences"),
            imp("subjects"),
            imp("require_expiration"),
            imp("max_lifetime"),
            imp("local_jwks"),
            imp("remote_jwks"),
            imp("forward"),
            imp("from_headers"),
            imp("from_params"),
            imp("from_cookies"),
            imp("forward_payload_header"),
            imp("pad_forward_payload_header"),
            imp("payload_in_metadata"),
            imp("normalize_payload_in_metadata"),
            imp("header_in_metadata"),
            imp("clock_skew_seconds"),
            imp("claim_to_headers"),
            imp("clear_route_cache"),
            ok(
                "jwt_cache_config",
                "sizes Envoy's verified-token cache; we verify every token (a cache is an optimisation)",
            ),
        ],
    ),
    msg(
        "envoy.extensions.filters.http.jwt_authn.v3.RemoteJwks",
        &[
            imp("http_uri"),
            imp("cache_duration"),
            imp("async_fetch"),
            imp("retry_policy"),
        ],
    ),
    msg(
        "envoy.config.core.v3.HttpUri",
        &[imp("uri"), imp("cluster"), imp("timeout")],
    ),
    msg(
        "envoy.extensions.filters.http.jwt_authn.v3.JwksAsyncFetch",
        &[
            imp("failed_refetch_duration"),
            ok(
                "fast_listener",
                "Envoy holds a new listener until the first fetch ends unless it is set; we fetch \
                 at the same moment the listener is published and a request that needs the keys \
                 before the fetch ends waits for it, so no token is judged without them either way",
            ),
        ],
    ),
    // Only `remote_jwks.retry_policy` compiles it; Envoy's conversion ignores the other fields
    // (fixed retry_on), so they stay refused rather than silently dropped.
    msg(
        "envoy.config.core.v3.RetryPolicy",
        &[imp("retry_back_off"), imp("num_retries")],
    ),
    msg(
        "envoy.config.core.v3.BackoffStrategy",
        &[imp("base_interval"), imp("max_interval")],
    ),
    msg(
        "envoy.extensions.filters.http.jwt_authn.v3.JwtHeader",
        &[imp("name"), imp("value_prefix")],
    ),
    msg(
        "envoy.extensions.filters.http.jwt_authn.v3.JwtProvider.NormalizePayload",
        &[imp("space_delimited_claims")],
    ),
    msg(
        "envoy.extensions.filters.http.jwt_authn.v3.JwtClaimToHeader",
        &[imp("header_name"), imp("claim_name"), imp("claim_path")],
    ),
    msg(
        "envoy.extensions.filters.http.jwt_authn.v3.JwtClaimToHeader.PathSegment",
        &[imp("key")],
    ),
    msg(
        "envoy.extensions.filters.http.jwt_authn.v3.RequirementRule",
        &[imp("match"), imp("requires"), imp("requirement_name")],
    ),
    msg(
        "envoy.extensions.filters.http.jwt_authn.v3.JwtRequirement",
        &[
            imp("provider_name"),
            imp("provider_and_audiences"),
            imp("requires_any"),
            imp("requires_all"),
            imp("allow_missing_or_failed"),
            imp("allow_missing"),
        ],
    ),
    msg(
        "envoy.extensions.filters.http.jwt_authn.v3.JwtRequirementOrList",
        &[imp("requirements")],
    ),
    msg(
        "envoy.extensions.filters.http.jwt_authn.v3.JwtRequirementAndList",
        &[imp("requirements")],
    ),
    msg(
        "envoy.extensions.filters.http.jwt_authn.v3.ProviderWithAudiences",
        &[imp("provider_name"), imp("audiences")],
    ),
    msg(
        "envoy.extensions.filters.http.compressor.v3.Compressor",
        &[
            imp("compressor_library"),
            imp("request_direction_config"),
            imp("response_direction_config"),
            imp("choose_first"),
        ],
    ),
    msg(
        "envoy.extensions.filters.http.compressor.v3.Compressor.CommonDirectionConfig",
        &[
            imp("enabled"),
            imp("min_content_length"),
            imp("content_type"),
            imp("content_type_matcher"),
        ],
    ),
    msg(
        "envoy.extensions.filters.http.compressor.v3.Compressor.RequestDirectionConfig",
        &[imp("common_config")],
    ),
    msg(
        "envoy.extensions.filters.http.compressor.v3.Compressor.ResponseDirectionConfig",
        &[
            imp("common_config"),
            imp("disable_on_etag_header"),
            imp("remove_accept_encoding_header"),
            imp("uncompressible_response_codes"),
        ],
    ),
    msg(
        "envoy.extensions.compression.gzip.compressor.v3.Gzip",
        &[
            imp("memory_level"),
            imp("compression_level"),
            imp("window_bits"),
            imp("chunk_size"),
        ],
    ),
    msg(
        "envoy.extensions.compression.brotli.compressor.v3.Brotli",
        &[imp("quality"), imp("window_bits"), imp("chunk_size")],
    ),
    msg(
        "envoy.extensions.compression.zstd.compressor.v3.Zstd",
        &[imp("compression_level"), imp("chunk_size")],
    ),
    // ---------------------------------------------------------------- access logs
    msg(
        "envoy.config.accesslog.v3.AccessLog",
        &[imp("name"), imp("filter"), imp("typed_config")],
    ),
    msg(
        "envoy.config.accesslog.v3.AccessLogFilter",
        &[
            imp("response_flag_filter"),
            imp("status_code_filter"),
            imp("duration_filter"),
            imp("not_health_check_filter"),
            imp("and_filter"),
            imp("or_filter"),
        ],
    ),
    msg(
        "envoy.config.accesslog.v3.StatusCodeFilter",
        &[imp("comparison")],
    ),
    msg(
        "envoy.config.accesslog.v3.DurationFilter",
        &[imp("comparison")],
    ),
    msg(
        "envoy.config.accesslog.v3.ComparisonFilter",
        &[imp("op"), imp("value")],
    ),
    msg(
        "envoy.config.core.v3.RuntimeUInt32",
        &[
            imp("default_value"),
            ok(
                "runtime_key",
                "no runtime layer can override the key, so default_value is the value in force",
            ),
        ],
    ),
    msg("envoy.config.accesslog.v3.AndFilter", &[imp("filters")]),
    msg("envoy.config.accesslog.v3.OrFilter", &[imp("filters")]),
    msg(
        "envoy.config.accesslog.v3.ResponseFlagFilter",
        &[imp("flags")],
    ),
    msg(
        "envoy.extensions.access_loggers.file.v3.FileAccessLog",
        &[imp("path"), imp("log_format")],
    ),
    msg(
        "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
        &[imp("log_format")],
    ),
    msg(
        "envoy.extensions.access_loggers.stream.v3.StderrAccessLog",
        &[imp("log_format")],
    ),
    // ---------------------------------------------------------------- clusters
    msg(
        "envoy.config.cluster.v3.Cluster",
        &[
            imp("name"),
            imp("type"),
            imp("eds_cluster_config"),
            imp("connect_timeout"),
            imp("per_connection_buffer_limit_bytes"),
            imp("lb_policy"),
            imp("load_assignment"),
            imp("max_requests_per_connection"),
            imp("circuit_breakers"),
            imp("outlier_detection"),
            imp("cleanup_interval"),
            imp("ring_hash_lb_config"),
            imp("maglev_lb_config"),
            imp("original_dst_lb_config"),
            imp("least_request_lb_config"),
            imp("round_robin_lb_config"),
            imp("common_lb_config"),
            imp("transport_socket"),
            imp("metadata"),
            imp("upstream_connection_options"),
            imp("close_connections_on_host_health_failure"),
            imp("ignore_health_on_host_removal"),
            imp("typed_extension_protocol_options"),
            ok("alt_stat_name", STATS_ONLY),
            ok("track_cluster_stats", STATS_ONLY),
            // STRICT_DNS / LOGICAL_DNS hold LIVE until their first resolution (other cluster
            // types are ready as soon as they are published).
            imp("wait_for_warm_on_init"),
            // STRICT_DNS / LOGICAL_DNS (upstream/dns.rs).
            imp("dns_refresh_rate"),
            imp("dns_jitter"),
            imp("dns_failure_refresh_rate"),
            imp("respect_dns_ttl"),
            imp("dns_lookup_family"),
            imp("dns_resolvers"),
            imp("use_tcp_for_dns_lookups"),
            imp("dns_resolution_config"),
            imp("typed_dns_resolver_config"),
        ],
    ),
    msg(
        "envoy.config.cluster.v3.Cluster.RefreshRate",
        &[imp("base_interval"), imp("max_interval")],
    ),
    msg(
        "envoy.config.core.v3.DnsResolutionConfig",
        &[imp("resolvers"), imp("dns_resolver_options")],
    ),
    msg(
        "envoy.config.core.v3.DnsResolverOptions",
        &[
            imp("use_tcp_for_dns_lookups"),
            imp("no_default_search_domain"),
        ],
    ),
    msg(
        "envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
        &[
            imp("resolvers"),
            imp("use_resolvers_as_fallback"),
            imp("dns_resolver_options"),
            imp("query_timeout_seconds"),
            imp("query_tries"),
            ok(
                "udp_max_queries",
                "caps queries per c-ares UDP socket; our resolver opens a socket per query",
            ),
        ],
    ),
    msg(
        "envoy.extensions.network.dns_resolver.getaddrinfo.v3.GetAddrInfoDnsResolverConfig",
        &[
            imp("num_retries"),
            ok(
                "num_resolver_threads",
                "sizes getaddrinfo's blocking thread pool; our resolver is asynchronous",
            ),
        ],
    ),
    msg(
        "envoy.config.cluster.v3.Cluster.EdsClusterConfig",
        &[imp("eds_config"), imp("service_name")],
    ),
    msg(
        "envoy.config.cluster.v3.CircuitBreakers",
        &[imp("thresholds"), imp("per_host_thresholds")],
    ),
    msg(
        "envoy.config.cluster.v3.CircuitBreakers.Thresholds",
        &[
            imp("priority"),
            imp("max_connections"),
            imp("max_pending_requests"),
            imp("max_requests"),
            imp("max_retries"),
            imp("retry_budget"),
            imp("max_connection_pools"),
            imp("track_remaining"),
        ],
    ),
    msg(
        "envoy.config.cluster.v3.CircuitBreakers.Thresholds.RetryBudget",
        &[imp("budget_percent"), imp("min_retry_concurrency")],
    ),
    msg(
        "envoy.config.cluster.v3.OutlierDetection",
        &[
            imp("consecutive_5xx"),
            imp("interval"),
            imp("base_ejection_time"),
            imp("max_ejection_time"),
            imp("max_ejection_percent"),
            imp("enforcing_consecutive_5xx"),
            imp("enforcing_success_rate"),
            imp("success_rate_minimum_hosts"),
            imp("success_rate_request_volume"),
            imp("success_rate_stdev_factor"),
            imp("consecutive_gateway_failure"),
            imp("enforcing_consecutive_gateway_failure"),
            imp("split_external_local_origin_errors"),
            imp("consecutive_local_origin_failure"),
            imp("enforcing_consecutive_local_origin_failure"),
            imp("enforcing_local_origin_success_rate"),
            imp("failure_percentage_threshold"),
            imp("enforcing_failure_percentage"),
            imp("enforcing_failure_percentage_local_origin"),
            imp("failure_percentage_minimum_hosts"),
            imp("failure_percentage_request_volume"),
            imp("always_eject_one_host"),
            imp("max_ejection_time_jitter"),
            ok("successful_active_health_check_uneject_host", NO_ACTIVE_HC),
        ],
    ),
    msg(
        "envoy.config.cluster.v3.Cluster.CommonLbConfig",
        &[
            imp("healthy_panic_threshold"),
            imp("locality_weighted_lb_config"),
            imp("close_connections_on_host_set_change"),
            imp("consistent_hashing_lb_config"),
            ok(
                "update_merge_window",
                "batches Envoy's host-set rebuilds; we rebuild once per xDS response anyway",
            ),
            ok("ignore_new_hosts_until_first_hc", NO_ACTIVE_HC),
        ],
    ),
    msg(
        "envoy.config.cluster.v3.Cluster.CommonLbConfig.ConsistentHashingLbConfig",
        &[imp("use_hostname_for_hashing")],
    ),
    msg(
        "envoy.config.cluster.v3.Cluster.RingHashLbConfig",
        &[
            imp("minimum_ring_size"),
            imp("maximum_ring_size"),
            imp("hash_function"),
        ],
    ),
    msg(
        "envoy.config.cluster.v3.Cluster.MaglevLbConfig",
        &[imp("table_size")],
    ),
    msg(
        "envoy.config.cluster.v3.Cluster.LeastRequestLbConfig",
        &[imp("choice_count")],
    ),
    msg("envoy.config.cluster.v3.Cluster.RoundRobinLbConfig", &[]),
    msg(
        "envoy.config.cluster.v3.Cluster.OriginalDstLbConfig",
        &[
            imp("use_http_header"),
            imp("http_header_name"),
            imp("upstream_port_override"),
            imp("metadata_key"),
        ],
    ),
    msg(
        "envoy.config.cluster.v3.UpstreamConnectionOptions",
        &[imp("tcp_keepalive")],
    ),
    msg(
        "envoy.config.core.v3.TcpKeepalive",
        &[
            imp("keepalive_probes"),
            imp("keepalive_time"),
            imp("keepalive_interval"),
        ],
    ),
    msg(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        &[
            imp("common_http_protocol_options"),
            imp("upstream_http_protocol_options"),
            imp("explicit_http_config"),
            imp("use_downstream_protocol_config"),
        ],
    ),
    msg(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions.ExplicitHttpConfig",
        &[imp("http_protocol_options"), imp("http2_protocol_options")],
    ),
    msg(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions.UseDownstreamHttpConfig",
        &[imp("http_protocol_options"), imp("http2_protocol_options")],
    ),
    // ---------------------------------------------------------------- endpoints
    msg(
        "envoy.config.endpoint.v3.ClusterLoadAssignment",
        &[imp("cluster_name"), imp("endpoints"), imp("policy")],
    ),
    msg(
        "envoy.config.endpoint.v3.ClusterLoadAssignment.Policy",
        &[imp("overprovisioning_factor")],
    ),
    msg(
        "envoy.config.endpoint.v3.LocalityLbEndpoints",
        &[
            imp("locality"),
            imp("lb_endpoints"),
            imp("load_balancing_weight"),
            imp("priority"),
            ok("metadata", OPAQUE_METADATA),
        ],
    ),
    msg(
        "envoy.config.endpoint.v3.LbEndpoint",
        &[
            imp("endpoint"),
            imp("health_status"),
            imp("metadata"),
            imp("load_balancing_weight"),
        ],
    ),
    msg(
        "envoy.config.endpoint.v3.Endpoint",
        &[
            imp("address"),
            imp("hostname"),
            imp("additional_addresses"),
            ok("health_check_config", NO_ACTIVE_HC),
            ok("observability_name", "names the host in admin output only"),
        ],
    ),
    msg(
        "envoy.config.endpoint.v3.Endpoint.AdditionalAddress",
        &[imp("address")],
    ),
    // ---------------------------------------------------------------- transport sockets
    msg(
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        &[
            imp("common_tls_context"),
            imp("require_client_certificate"),
            imp("require_sni"),
            imp("disable_stateless_session_resumption"),
            imp("disable_stateful_session_resumption"),
            imp("session_timeout"),
        ],
    ),
    msg(
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        &[
            imp("common_tls_context"),
            imp("sni"),
            imp("auto_host_sni"),
            imp("auto_sni_san_validation"),
            imp("max_session_keys"),
        ],
    ),
    msg(
        "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext",
        &[
            imp("tls_params"),
            imp("alpn_protocols"),
            imp("tls_certificate_sds_secret_configs"),
            imp("validation_context_sds_secret_config"),
            imp("combined_validation_context"),
        ],
    ),
    msg(
        "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext.CombinedCertificateValidationContext",
        &[
            imp("default_validation_context"),
            imp("validation_context_sds_secret_config"),
        ],
    ),
    msg(
        "envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext",
        &[
            imp("match_typed_subject_alt_names"),
            imp("trust_chain_verification"),
            imp("max_verify_depth"),
        ],
    ),
    msg(
        "envoy.extensions.transport_sockets.tls.v3.SubjectAltNameMatcher",
        &[imp("san_type"), imp("matcher")],
    ),
    msg(
        "envoy.extensions.transport_sockets.tls.v3.SdsSecretConfig",
        &[imp("name"), imp("sds_config")],
    ),
    msg(
        "envoy.extensions.transport_sockets.tls.v3.TlsParameters",
        &[
            imp("tls_minimum_protocol_version"),
            imp("tls_maximum_protocol_version"),
            imp("cipher_suites"),
            imp("ecdh_curves"),
        ],
    ),
    msg(
        "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
        &[imp("passthrough_metadata"), imp("transport_socket")],
    ),
    msg(
        "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport.MetadataValueSource",
        &[imp("kind"), imp("name")],
    ),
    // ---------------------------------------------------------------- WDS
    MessageRule {
        message: "istio.workload.Workload",
        fields: &[
            imp("uid"),
            imp("name"),
            imp("namespace"),
            imp("addresses"),
            imp("hostname"),
            imp("network"),
            imp("tunnel_protocol"),
            imp("trust_domain"),
            imp("service_account"),
            imp("node"),
            imp("canonical_name"),
            imp("canonical_revision"),
            imp("workload_type"),
            imp("workload_name"),
            imp("authorization_policies"),
            imp("status"),
            imp("cluster_id"),
            imp("services"),
        ],
        // Our workload.proto is a subset on purpose: a Workload is peer information (identity and
        // telemetry labels), and the fields we leave out (waypoint, locality, capacity …) steer
        // ztunnel, not the waypoint.
        ignore_unknown_numbers: true,
    },
    msg("istio.workload.PortList", &[imp("ports")]),
    msg(
        "istio.workload.Port",
        &[imp("service_port"), imp("target_port")],
    ),
    // ---------------------------------------------------------------- bootstrap
    msg(
        "envoy.config.bootstrap.v3.Bootstrap",
        &[
            imp("node"),
            imp("static_resources"),
            imp("dynamic_resources"),
            imp("admin"),
            imp("bootstrap_extensions"),
            imp("overload_manager"),
            imp("cluster_manager"),
            imp("stats_config"),
            ok(
                "layered_runtime",
                "Envoy runtime feature flags; no code path here consults a runtime key",
            ),
            ok(
                "application_log_config",
                "the format of Envoy's own log lines; ours come from tracing-subscriber",
            ),
            ok(
                "deferred_stat_options",
                "a memory optimisation of Envoy's stat creation; ours are created on first use anyway",
            ),
            ok(
                "stats_flush_interval",
                "no stats sinks are configured, so there is nothing to flush",
            ),
        ],
    ),
    // stats_config: tag extraction (admin/stats.rs), the stats matcher (stats_matcher.rs), bucket
    // rules for Istio's histograms (telemetry/mod.rs). `allow_default_tag_overrides` and `bins`
    // are not implemented, so they are refused.
    msg(
        "envoy.config.metrics.v3.StatsConfig",
        &[
            imp("stats_tags"),
            imp("use_all_default_tags"),
            imp("stats_matcher"),
            imp("histogram_bucket_settings"),
        ],
    ),
    msg(
        "envoy.config.metrics.v3.TagSpecifier",
        &[imp("tag_name"), imp("regex"), imp("fixed_value")],
    ),
    msg(
        "envoy.config.metrics.v3.StatsMatcher",
        &[
            imp("reject_all"),
            imp("exclusion_list"),
            imp("inclusion_list"),
        ],
    ),
    msg(
        "envoy.config.metrics.v3.HistogramBucketSettings",
        &[imp("match"), imp("buckets")],
    ),
    msg(
        "envoy.config.bootstrap.v3.Bootstrap.StaticResources",
        &[imp("listeners"), imp("clusters")],
    ),
    msg(
        "envoy.config.bootstrap.v3.Bootstrap.DynamicResources",
        &[imp("lds_config"), imp("cds_config"), imp("ads_config")],
    ),
    msg(
        "envoy.config.bootstrap.v3.Admin",
        &[
            imp("address"),
            ok(
                "access_log",
                "admin requests are not access-logged; the admin API only listens on localhost",
            ),
            ok("access_log_path", "admin requests are not access-logged"),
            ok("profile_path", "the CPU profiler endpoints are not served"),
            ok(
                "ignore_global_conn_limit",
                "the admin listener is never counted against the global connection limit",
            ),
        ],
    ),
    msg(
        "envoy.config.bootstrap.v3.ClusterManager",
        &[
            ok(
                "outlier_detection",
                "where Envoy writes outlier ejection events; ejections are logged through tracing",
            ),
            ok(
                "enable_deferred_cluster_creation",
                "a memory optimisation of Envoy's cluster creation; semantics are unchanged",
            ),
        ],
    ),
    msg(
        "envoy.config.core.v3.Node",
        &[
            imp("id"),
            imp("cluster"),
            imp("metadata"),
            imp("locality"),
            ok(
                "user_agent_name",
                "sent to the xDS server as-is; Envoy fills it in itself",
            ),
            ok(
                "user_agent_version",
                "sent to the xDS server as-is; Envoy fills it in itself",
            ),
            ok(
                "client_features",
                "sent to the xDS server as-is; it only advertises capabilities",
            ),
        ],
    ),
    msg(
        "envoy.config.overload.v3.OverloadManager",
        &[
            imp("resource_monitors"),
            ok(
                "refresh_interval",
                "how often Envoy samples resource monitors; the connection monitor is exact, not sampled",
            ),
        ],
    ),
    msg(
        "envoy.config.overload.v3.ResourceMonitor",
        &[imp("name"), imp("typed_config")],
    ),
    msg(
        "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
        &[imp("max_active_downstream_connections")],
    ),
    msg(
        "envoy.extensions.bootstrap.internal_listener.v3.InternalListener",
        &[ok(
            "buffer_size_kb",
            "the buffer of Envoy's user-space socket pair; our internal listeners hand over in-memory streams",
        )],
    ),
    msg("istio.workload.BootstrapExtension", &[imp("config_source")]),
];

/// Per extension type: where it may appear and whether we implement it.
pub static EXTENSIONS: &[ExtensionRule] = &[
    // wrappers
    ext("udpa.type.v1.TypedStruct", ExtensionKind::Wrapper),
    ext("xds.type.v3.TypedStruct", ExtensionKind::Wrapper),
    // listener filters
    ext(
        "envoy.extensions.filters.listener.original_dst.v3.OriginalDst",
        ExtensionKind::ListenerFilter,
    ),
    ext(
        "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector",
        ExtensionKind::ListenerFilter,
    ),
    ext(
        "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
        ExtensionKind::ListenerFilter,
    ),
    // network filters
    ext(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        ExtensionKind::NetworkFilter,
    ),
    ext(
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        ExtensionKind::NetworkFilter,
    ),
    ext(
        "envoy.extensions.filters.network.set_filter_state.v3.Config",
        ExtensionKind::NetworkFilter,
    ),
    ext(
        "envoy.extensions.filters.network.rbac.v3.RBAC",
        ExtensionKind::NetworkFilter,
    ),
    ext_struct(
        "envoy.tcp.metadataexchange.config.MetadataExchange",
        ExtensionKind::NetworkFilter,
    ),
    ext_struct(
        "envoy.extensions.network_filters.peer_metadata.Config",
        ExtensionKind::NetworkFilter,
    ),
    // stats.PluginConfig is both a network and an HTTP filter; the position check allows both.
    ext("stats.PluginConfig", ExtensionKind::NetworkFilter),
    // HTTP filters
    ext(
        "envoy.extensions.filters.http.router.v3.Router",
        ExtensionKind::HttpFilter,
    ),
    ext(
        "envoy.extensions.filters.http.set_filter_state.v3.Config",
        ExtensionKind::HttpFilter,
    ),
    ext_struct(
        "io.istio.http.peer_metadata.Config",
        ExtensionKind::HttpFilter,
    ),
    ext(
        "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
        ExtensionKind::HttpFilter,
    ),
    ext(
        "envoy.extensions.filters.http.fault.v3.HTTPFault",
        ExtensionKind::HttpFilter,
    ),
    ext(
        "envoy.extensions.filters.http.cors.v3.Cors",
        ExtensionKind::HttpFilter,
    ),
    // Also a per-route config (`PerFilterConfig::compile` accepts it there).
    ext(
        "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        ExtensionKind::HttpFilter,
    ),
    ext(
        "envoy.extensions.filters.http.rbac.v3.RBAC",
        ExtensionKind::HttpFilter,
    ),
    ext(
        "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        ExtensionKind::HttpFilter,
    ),
    // Istio's bootstrap compresses its Prometheus listener (15090); responses stay correct HTTP
    // uncompressed, so the filter is accepted and passes responses through (see README).
    ext(
        "envoy.extensions.filters.http.compressor.v3.Compressor",
        ExtensionKind::HttpFilter,
    ),
    // per-route filter configs
    ext(
        "envoy.extensions.filters.http.cors.v3.CorsPolicy",
        ExtensionKind::PerRouteFilter,
    ),
    ext(
        "envoy.extensions.filters.http.rbac.v3.RBACPerRoute",
        ExtensionKind::PerRouteFilter,
    ),
    ext(
        "envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig",
        ExtensionKind::PerRouteFilter,
    ),
    ext(
        "envoy.config.route.v3.FilterConfig",
        ExtensionKind::PerRouteFilter,
    ),
    // transport sockets
    ext(
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        ExtensionKind::TransportSocket,
    ),
    ext(
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        ExtensionKind::TransportSocket,
    ),
    ext(
        "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
        ExtensionKind::TransportSocket,
    ),
    ext(
        "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer",
        ExtensionKind::TransportSocket,
    ),
    // cluster protocol options
    ext(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        ExtensionKind::ProtocolOptions,
    ),
    // matchers
    ext(
        "envoy.extensions.matching.common_inputs.network.v3.DestinationIPInput",
        ExtensionKind::MatchInput,
    ),
    ext(
        "envoy.extensions.matching.common_inputs.network.v3.DestinationPortInput",
        ExtensionKind::MatchInput,
    ),
    ext(
        "envoy.extensions.matching.common_inputs.network.v3.SourceIPInput",
        ExtensionKind::MatchInput,
    ),
    ext(
        "envoy.extensions.matching.common_inputs.network.v3.ServerNameInput",
        ExtensionKind::MatchInput,
    ),
    ext(
        "envoy.extensions.matching.common_inputs.network.v3.TransportProtocolInput",
        ExtensionKind::MatchInput,
    ),
    ext(
        "envoy.extensions.matching.common_inputs.network.v3.ApplicationProtocolInput",
        ExtensionKind::MatchInput,
    ),
    ext(
        "envoy.extensions.matching.common_inputs.network.v3.FilterStateInput",
        ExtensionKind::MatchInput,
    ),
    ext("google.protobuf.StringValue", ExtensionKind::MatchAction),
    ext(
        "xds.type.matcher.v3.IPMatcher",
        ExtensionKind::CustomMatcher,
    ),
    // routes
    ext(
        "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate",
        ExtensionKind::RetryHostPredicate,
    ),
    ext(
        "envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
        ExtensionKind::RetryPriority,
    ),
    // RBAC
    ext(
        "envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig",
        ExtensionKind::PathMatcher,
    ),
    ext(
        "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
        ExtensionKind::RequestId,
    ),
    // access logs
    ext(
        "envoy.extensions.access_loggers.file.v3.FileAccessLog",
        ExtensionKind::AccessLogger,
    ),
    ext(
        "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
        ExtensionKind::AccessLogger,
    ),
    ext(
        "envoy.extensions.access_loggers.stream.v3.StderrAccessLog",
        ExtensionKind::AccessLogger,
    ),
    // compression libraries (stats listener of the bootstrap)
    ext(
        "envoy.extensions.compression.gzip.compressor.v3.Gzip",
        ExtensionKind::Compression,
    ),
    ext(
        "envoy.extensions.compression.brotli.compressor.v3.Brotli",
        ExtensionKind::Compression,
    ),
    ext(
        "envoy.extensions.compression.zstd.compressor.v3.Zstd",
        ExtensionKind::Compression,
    ),
    // bootstrap
    ext(
        "istio.workload.BootstrapExtension",
        ExtensionKind::BootstrapExtension,
    ),
    ext(
        "envoy.extensions.bootstrap.internal_listener.v3.InternalListener",
        ExtensionKind::BootstrapExtension,
    ),
    ext(
        "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
        ExtensionKind::ResourceMonitor,
    ),
    ext(
        "envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
        ExtensionKind::DnsResolver,
    ),
    ext(
        "envoy.extensions.network.dns_resolver.getaddrinfo.v3.GetAddrInfoDnsResolverConfig",
        ExtensionKind::DnsResolver,
    ),
];

/// Enum fields for which we implement only some values.
pub static ENUMS: &[EnumRule] = &[
    enums("envoy.config.core.v3.SocketAddress", "protocol", &["TCP"]),
    enums(
        "envoy.config.cluster.v3.Cluster",
        "type",
        &["STATIC", "EDS", "ORIGINAL_DST", "STRICT_DNS", "LOGICAL_DNS"],
    ),
    enums(
        "envoy.config.cluster.v3.Cluster",
        "lb_policy",
        &[
            "ROUND_ROBIN",
            "LEAST_REQUEST",
            "RANDOM",
            "RING_HASH",
            "MAGLEV",
            "CLUSTER_PROVIDED",
        ],
    ),
    enums(
        "envoy.config.cluster.v3.Cluster.RingHashLbConfig",
        "hash_function",
        &["XX_HASH"],
    ),
    enums(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "codec_type",
        &["AUTO", "HTTP1", "HTTP2"],
    ),
    enums(
        "envoy.config.core.v3.ApiConfigSource",
        "api_type",
        &[
            "GRPC",
            "DELTA_GRPC",
            "AGGREGATED_GRPC",
            "AGGREGATED_DELTA_GRPC",
        ],
    ),
    enums(
        "envoy.config.core.v3.ApiConfigSource",
        "transport_api_version",
        &["AUTO", "V3"],
    ),
    enums(
        "envoy.config.core.v3.ConfigSource",
        "resource_api_version",
        &["AUTO", "V3"],
    ),
    enums(
        "envoy.extensions.transport_sockets.tls.v3.TlsParameters",
        "tls_minimum_protocol_version",
        &["TLS_AUTO", "TLSv1_2", "TLSv1_3"],
    ),
    enums(
        "envoy.extensions.transport_sockets.tls.v3.TlsParameters",
        "tls_maximum_protocol_version",
        &["TLS_AUTO", "TLSv1_2", "TLSv1_3"],
    ),
    enums(
        "envoy.extensions.transport_sockets.tls.v3.SubjectAltNameMatcher",
        "san_type",
        &["DNS", "URI", "IP_ADDRESS", "EMAIL"],
    ),
    enums(
        "envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext",
        "trust_chain_verification",
        &["VERIFY_TRUST_CHAIN"],
    ),
];

fn message_index() -> &'static HashMap<&'static str, &'static MessageRule> {
    static INDEX: OnceLock<HashMap<&'static str, &'static MessageRule>> = OnceLock::new();
    INDEX.get_or_init(|| MESSAGES.iter().map(|m| (m.message, m)).collect())
}

fn extension_index() -> &'static HashMap<&'static str, &'static ExtensionRule> {
    static INDEX: OnceLock<HashMap<&'static str, &'static ExtensionRule>> = OnceLock::new();
    INDEX.get_or_init(|| EXTENSIONS.iter().map(|e| (e.type_name, e)).collect())
}

/// The accepted fields of `message` (full name), if it has an entry.
pub fn message(message: &str) -> Option<&'static MessageRule> {
    message_index().get(message).copied()
}

/// The rule for an extension type (full message name, not URL).
pub fn extension(type_name: &str) -> Option<&'static ExtensionRule> {
    extension_index().get(type_name).copied()
}

/// The implemented values of an enum field, when restricted.
pub fn enum_values(message: &str, field: &str) -> Option<&'static [&'static str]> {
    ENUMS
        .iter()
        .find(|e| e.message == message && e.field == field)
        .map(|e| e.values)
}

/// Counts for reports: (messages, implemented fields, harmless fields, extension types).
pub fn summary() -> (usize, usize, usize, usize) {
    let (mut implemented, mut harmless) = (0, 0);
    for m in MESSAGES {
        for f in m.fields {
            match f.support {
                Support::Implemented => implemented += 1,
                Support::Harmless(_) => harmless += 1,
            }
        }
    }
    (MESSAGES.len(), implemented, harmless, EXTENSIONS.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use waypoint_proto::json;

    /// Every entry names a real message and real fields, so a typo cannot silently reject (or
    /// accept) something.
    #[test]
    fn table_names_exist_in_the_schema() {
        let mut seen = std::collections::HashSet::new();
        for m in MESSAGES {
            assert!(seen.insert(m.message), "duplicate entry {}", m.message);
            let struct_only = extension(m.message).is_some_and(|e| e.struct_only);
            if struct_only {
                continue;
            }
            let desc = json::message_descriptor(m.message)
                .unwrap_or_else(|_| panic!("unknown message {}", m.message));
            let mut names = std::collections::HashSet::new();
            for f in m.fields {
                assert!(names.insert(f.name), "{}: duplicate {}", m.message, f.name);
                assert!(
                    desc.get_field_by_name(f.name).is_some(),
                    "{} has no field {}",
                    m.message,
                    f.name
                );
                if let Support::Harmless(why) = f.support {
                    assert!(!why.is_empty(), "{}.{} needs a reason", m.message, f.name);
                }
            }
        }
        for e in EXTENSIONS {
            if e.struct_only {
                assert!(
                    message(e.type_name).is_some(),
                    "{} needs its keys",
                    e.type_name
                );
            } else {
                assert!(
                    json::message_descriptor(e.type_name).is_ok(),
                    "unknown extension {}",
                    e.type_name
                );
            }
        }
        for e in ENUMS {
            let desc = json::message_descriptor(e.message).expect("message");
            let field = desc.get_field_by_name(e.field).expect("field");
            let prost_reflect::Kind::Enum(en) = field.kind() else {
                panic!("{}.{} is not an enum", e.message, e.field)
            };
            for v in e.values {
                assert!(
                    en.get_value_by_name(v).is_some(),
                    "{}.{}: no value {v}",
                    e.message,
                    e.field
                );
            }
        }
    }
}
