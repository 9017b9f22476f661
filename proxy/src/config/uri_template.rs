//! Envoy's URI template path matcher (`envoy.path.match.uri_template.uri_template_matcher`,
//! `UriTemplateMatchConfig.path_template`), as RBAC's `Permission.uri_template` uses it: istiod
//! emits it for AuthorizationPolicy paths with `{*}` / `{**}`, rewritten to `*` / `**`
//! (`/api/*/items/**`).
//!
//! The grammar is Envoy's (`uri_template_lib`): a template starts with `/`; its `/`-separated
//! segments are literals (RFC 3986 pchar: `a-zA-Z0-9-._~%!$&'()+,;:@=`), `*` (exactly one
//! non-empty segment), `**` (zero or more segments; no operator may follow it), or variables
//! `{name}` (= `{name=*}`) and `{name=<literals and operators joined by />}`. A segment may add a
//! literal suffix after an operator or variable (`*.m4s`, `**.mpd`, `{id}.json`) and a literal
//! prefix before a variable (`v{version}`); a trailing `/` is an empty last segment. At most five
//! variables, named `[a-zA-Z][a-zA-Z0-9_]*` in 1 to 16 characters, each once.
//!
//! As Envoy does for RE2, the template compiles into one anchored regex (the `regex` crate is
//! linear-time too); a path matches when all of it, without query and fragment, matches.

use regex::Regex;

use super::{CompileResult, ConfigError};

/// RFC 3986 pchar without `/`, `*` and `?` (Envoy's `kLiteral`).
const PCHAR: &str = "a-zA-Z0-9\\-._~%!$&'()+,;:@=";
/// Envoy's limits on variables.
const MAX_VARIABLES: usize = 5;
const MAX_VARIABLE_NAME: usize = 16;
/// `UriTemplateMatchConfig.path_template` length bounds (proto validation).
const MAX_TEMPLATE_LEN: usize = 256;

/// A compiled path template.
#[derive(Debug, Clone)]
pub struct UriTemplate {
    template: String,
    regex: Regex,
}

impl UriTemplate {
    /// Compiles `template` (at config `path`).
    pub fn compile(template: &str, path: &str) -> CompileResult<Self> {
        let err =
            |why: String| ConfigError::new(path, format!("path template {template:?}: {why}"));
        if template.is_empty() || template.len() > MAX_TEMPLATE_LEN {
            return Err(err(format!(
                "must be 1 to {MAX_TEMPLATE_LEN} characters long"
            )));
        }
        let segments = parse(template).map_err(err)?;
        validate(&segments).map_err(err)?;
        let mut pattern = String::from("^");
        for s in &segments {
            pattern.push('/');
            s.push_regex(&mut pattern);
        }
        if segments.is_empty() {
            pattern.push('/');
        }
        pattern.push('$');
        let regex = Regex::new(&pattern).map_err(|e| err(e.to_string()))?;
        Ok(UriTemplate {
            template: template.to_owned(),
            regex,
        })
    }

    /// The template as configured.
    pub fn template(&self) -> &str {
        &self.template
    }

    /// Whether `path` (its query and fragment are ignored) matches.
    pub fn matches(&self, path: &str) -> bool {
        let end = path.find(['?', '#']).unwrap_or(path.len());
        self.regex.is_match(&path[..end])
    }
}

/// `*` or `**`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Glob {
    /// `*`: one non-empty segment.
    Segment,
    /// `**`: any text, `/` included.
    Text,
}

/// A literal or operator inside a variable's match (`{name=videos/*}`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Glob(Glob),
}

/// The dynamic middle of a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Core {
    Glob(Glob),
    Variable {
        name: String,
        /// Empty: the default `*`.
        parts: Vec<Part>,
    },
}

/// One `/`-separated segment: a literal, or prefix + operator/variable + suffix.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Dynamic {
        prefix: String,
        core: Core,
        suffix: String,
    },
}

impl Segment {
    fn push_regex(&self, out: &mut String) {
        match self {
            Segment::Literal(l) => out.push_str(&regex::escape(l)),
            Segment::Dynamic {
                prefix,
                core,
                suffix,
            } => {
                out.push_str(&regex::escape(prefix));
                match core {
                    Core::Glob(g) => push_glob(*g, out),
                    Core::Variable { parts, .. } if parts.is_empty() => {
                        push_glob(Glob::Segment, out)
                    }
                    Core::Variable { parts, .. } => {
                        out.push_str("(?:");
                        for (i, p) in parts.iter().enumerate() {
                            if i > 0 {
                                out.push('/');
                            }
                            match p {
                                Part::Literal(l) => out.push_str(&regex::escape(l)),
                                Part::Glob(g) => push_glob(*g, out),
                            }
                        }
                        out.push(')');
                    }
                }
                out.push_str(&regex::escape(suffix));
            }
        }
    }
}

fn push_glob(g: Glob, out: &mut String) {
    match g {
        Glob::Segment => {
            out.push('[');
            out.push_str(PCHAR);
            out.push_str("]+");
        }
        Glob::Text => {
            out.push('[');
            out.push_str(PCHAR);
            out.push_str("/]*");
        }
    }
}

fn valid_literal(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~%!$&'()+,;:@=".contains(&b))
}

fn literal(s: &str) -> Result<String, String> {
    if valid_literal(s) {
        Ok(s.to_owned())
    } else {
        Err(format!("invalid literal {s:?}"))
    }
}

/// `**` or `*` at the start of `s`, and the rest.
fn glob(s: &str) -> Option<(Glob, &str)> {
    if let Some(rest) = s.strip_prefix("**") {
        Some((Glob::Text, rest))
    } else {
        s.strip_prefix('*').map(|rest| (Glob::Segment, rest))
    }
}

/// `{name}` or `{name=parts}` at the start of `s`, and the rest.
fn variable(s: &str) -> Result<(Core, &str), String> {
    let inner = s.strip_prefix('{').ok_or("expected '{'")?;
    let (body, rest) = inner
        .split_once('}')
        .ok_or_else(|| format!("unmatched '{{' in {s:?}"))?;
    let (name, spec) = match body.split_once('=') {
        Some((n, m)) => (n, Some(m)),
        None => (body, None),
    };
    let mut chars = name.chars();
    let name_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !name_ok {
        return Err(format!("invalid variable name {name:?}"));
    }
    let mut parts = Vec::new();
    if let Some(mut spec) = spec {
        if spec.is_empty() {
            return Err(format!("empty match for variable {name:?}"));
        }
        while !spec.is_empty() {
            let (part, after) = match glob(spec) {
                Some((g, after)) => (Part::Glob(g), after),
                None => {
                    let end = spec.find('/').unwrap_or(spec.len());
                    (Part::Literal(literal(&spec[..end])?), &spec[end..])
                }
            };
            parts.push(part);
            spec = match after.strip_prefix('/') {
                Some(next) if !next.is_empty() => next,
                None if after.is_empty() => after,
                _ => return Err(format!("invalid match for variable {name:?}")),
            };
        }
    }
    Ok((
        Core::Variable {
            name: name.to_owned(),
            parts,
        },
        rest,
    ))
}

/// Literal text up to the next `/` (or the end), and the rest.
fn suffix(s: &str) -> Result<(String, &str), String> {
    let end = s.find('/').unwrap_or(s.len());
    let text = &s[..end];
    let text = if text.is_empty() {
        String::new()
    } else {
        literal(text)?
    };
    Ok((text, &s[end..]))
}

fn parse(template: &str) -> Result<Vec<Segment>, String> {
    let Some(mut rest) = template.strip_prefix('/') else {
        return Err("must start with '/'".into());
    };
    if !rest.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("only printable ASCII without spaces is allowed".into());
    }
    let mut segments = Vec::new();
    while !rest.is_empty() {
        let segment = if let Some((g, after)) = glob(rest) {
            let (suffix, after) = suffix(after)?;
            rest = after;
            Segment::Dynamic {
                prefix: String::new(),
                core: Core::Glob(g),
                suffix,
            }
        } else {
            let end = rest.find(['/', '{']).unwrap_or(rest.len());
            if rest[end..].starts_with('{') {
                let prefix = if end == 0 {
                    String::new()
                } else {
                    literal(&rest[..end])?
                };
                let (core, after) = variable(&rest[end..])?;
                let (suffix, after) = suffix(after)?;
                rest = after;
                Segment::Dynamic {
                    prefix,
                    core,
                    suffix,
                }
            } else {
                let lit = literal(&rest[..end])?;
                rest = &rest[end..];
                Segment::Literal(lit)
            }
        };
        segments.push(segment);
        if rest == "/" {
            // A trailing '/': an empty last segment.
            segments.push(Segment::Literal(String::new()));
            break;
        }
        if let Some(next) = rest.strip_prefix('/') {
            rest = next;
        } else if !rest.is_empty() {
            return Err(format!("unexpected {rest:?}"));
        }
    }
    Ok(segments)
}

/// Envoy's checks after parsing: variable count and names, and nothing glob-like after `**`.
fn validate(segments: &[Segment]) -> Result<(), String> {
    let mut names: Vec<&str> = Vec::new();
    let mut after_text_glob = false;
    for s in segments {
        let Segment::Dynamic { core, .. } = s else {
            continue;
        };
        let globs: Vec<Glob> = match core {
            Core::Glob(g) => vec![*g],
            Core::Variable { name, parts } => {
                if names.len() >= MAX_VARIABLES {
                    return Err(format!("more than {MAX_VARIABLES} variables"));
                }
                if name.len() > MAX_VARIABLE_NAME {
                    return Err(format!(
                        "variable name {name:?} is longer than {MAX_VARIABLE_NAME}"
                    ));
                }
                if names.contains(&name.as_str()) {
                    return Err(format!("repeated variable name {name:?}"));
                }
                names.push(name);
                if parts.is_empty() {
                    // A bare variable is an implicit `*`.
                    vec![Glob::Segment]
                } else {
                    parts
                        .iter()
                        .filter_map(|p| match p {
                            Part::Glob(g) => Some(*g),
                            Part::Literal(_) => None,
                        })
                        .collect()
                }
            }
        };
        for g in globs {
            if after_text_glob {
                return Err("no operator may follow '**'".into());
            }
            after_text_glob = g == Glob::Text;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(template: &str) -> UriTemplate {
        UriTemplate::compile(template, "uri_template").unwrap_or_else(|e| panic!("{template}: {e}"))
    }

    fn check(template: &str, matching: &[&str], not_matching: &[&str]) {
        let m = t(template);
        for p in matching {
            assert!(m.matches(p), "{template} should match {p}");
        }
        for p in not_matching {
            assert!(!m.matches(p), "{template} should not match {p}");
        }
    }

    #[test]
    fn istio_single_and_multi_segment_globs() {
        // AuthorizationPolicy paths "/foo/{*}/bar" and "/foo/{**}" as istiod emits them.
        check(
            "/foo/*/bar",
            &[
                "/foo/x/bar",
                "/foo/x-y.z~1/bar",
                "/foo/x/bar?q=1",
                "/foo/x/bar#f",
            ],
            &[
                "/foo//bar",
                "/foo/x/y/bar",
                "/foo/bar",
                "/foo/x/bar/",
                "/foo/x/barn",
            ],
        );
        check(
            "/foo/**",
            &["/foo/", "/foo/a", "/foo/a/b/c", "/foo/a/b/c/"],
            &["/foo", "/food/a", "/bar/foo/a"],
        );
        check(
            "/api/*/items/**",
            &["/api/v1/items/", "/api/v1/items/1/2"],
            &["/api/items/1", "/api/v1/v2/items/1"],
        );
        check("/*", &["/a", "/a%20b"], &["/", "/a/b"]);
        check("/**", &["/", "/a", "/a/b/c"], &[""]);
    }

    #[test]
    fn envoy_documented_examples() {
        check(
            "/videos/*/*/*.m4s",
            &["/videos/123414/hls/1080p5000_00001.m4s"],
            &["/videos/123414/hls/1080p5000_00001.mp4", "/videos/1/2/.m4s"],
        );
        check(
            "/videos/{file}",
            &["/videos/1080p5000_00001.m4s"],
            &["/videos/a/b", "/videos/"],
        );
        check(
            "/**.mpd",
            &["/content/123/india/dash/55/manifest.mpd", "/.mpd"],
            &["/content/manifest.mp4"],
        );
        check(
            "/api/v{version}/users/{id}.json",
            &["/api/v2/users/456.json"],
            &[
                "/api/2/users/456.json",
                "/api/v2/users/456.xml",
                "/api/v/users/1.json",
            ],
        );
        check(
            "/{name=videos/*}/play",
            &["/videos/1/play"],
            &["/videos/play", "/music/1/play"],
        );
        check("/files/{path=**}", &["/files/", "/files/a/b"], &["/file/a"]);
        check("/bar/{lang}/{country}", &["/bar/en/us"], &["/bar/en"]);
    }

    #[test]
    fn literals_are_exact_and_trailing_slash_counts() {
        check("/a.b/c", &["/a.b/c"], &["/axb/c", "/a.b/c/"]);
        check("/a/", &["/a/"], &["/a"]);
        check("/", &["/"], &["/a"]);
        // Characters outside pchar never match a glob.
        check("/x/*", &["/x/y"], &["/x/a b", "/x/a\"b"]);
    }

    #[test]
    fn envoy_rejects_these_templates() {
        for bad in [
            "",
            "foo",
            "/foo bar",
            "/**/*",
            "/**/{x}",
            "/{a=**}/*",
            "/a//b",
            "/a*b",
            "/{1x}",
            "/{x=}",
            "/{x=a/}",
            "/{x}/{x}",
            "/{unterminated",
            "/{a}/{b}/{c}/{d}/{e}/{f}",
            "/{abcdefghijklmnopq}",
            "/a?b",
        ] {
            let e = UriTemplate::compile(bad, "rules.policies[\"p\"].permissions[0].uri_template")
                .expect_err(bad);
            assert!(
                e.to_string()
                    .starts_with("rules.policies[\"p\"].permissions[0].uri_template: "),
                "{e}"
            );
        }
        let long = format!("/{}", "a".repeat(MAX_TEMPLATE_LEN));
        assert!(UriTemplate::compile(&long, "p").is_err());
        // Literals may follow '**'; operators may not.
        assert!(UriTemplate::compile("/**/end", "p").is_ok());
        assert!(UriTemplate::compile("/{a=*}/{b=**}", "p").is_ok());
    }
}
