//! host/openapi.json against the code: its paths and methods are exactly
//! the router's routes (`routes::routes`), every `$ref` resolves, every
//! schema is used, and the JSON of every API type and event kind (the
//! golden samples) is valid against the schema the document names for it,
//! and every user, VM, UA and session name (path, query, body) carries
//! `uve_protocol::names::NAME_PATTERN` and its length bounds. The
//! validator covers the part of JSON Schema the document uses.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};
use uve_protocol::defs::MAX_NAME_LEN;
use uve_protocol::names::{self, NAME_PATTERN};

use super::routes::routes;
use super::types::ApiErrorCode;

const DOC: &str = include_str!("../../openapi.json");

fn doc() -> Value {
    serde_json::from_str(DOC).expect("host/openapi.json is JSON")
}

fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc.pointer(&format!("/components/schemas/{name}"))
        .unwrap_or_else(|| panic!("no schema {name} in host/openapi.json"))
}

#[test]
fn every_route_is_documented_and_every_documented_route_exists() {
    let doc = doc();
    let served: BTreeSet<(String, String)> = routes()
        .table()
        .iter()
        .map(|(verb, path)| (path.to_string(), verb.as_str().to_string()))
        .collect();
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((path.clone(), method.clone()));
        }
    }
    let missing: Vec<_> = served.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&served).collect();
    assert!(
        missing.is_empty(),
        "routes missing from openapi.json: {missing:?}"
    );
    assert!(
        extra.is_empty(),
        "openapi.json documents no such route: {extra:?}"
    );
}

/// Calls `found` with the string value of every `key` field anywhere in
/// `v`, depth first (a field before what its object holds).
fn strings_of(v: &Value, key: &str, found: &mut impl FnMut(&str)) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(s)) = m.get(key) {
                found(s);
            }
            m.values().for_each(|x| strings_of(x, key, found));
        }
        Value::Array(a) => a.iter().for_each(|x| strings_of(x, key, found)),
        _ => {}
    }
}

#[test]
fn every_ref_resolves_and_every_schema_is_used() {
    let doc = doc();
    let mut used = BTreeSet::new();
    strings_of(&doc, "$ref", &mut |r| {
        used.insert(r.to_string());
    });
    for r in &used {
        let name = r.strip_prefix("#/components/schemas/").unwrap();
        schema(&doc, name);
    }
    for name in doc["components"]["schemas"].as_object().unwrap().keys() {
        let r = format!("#/components/schemas/{name}");
        assert!(used.contains(&r), "schema {name} is not used");
    }
    let codes: Vec<&str> = ApiErrorCode::every().map(ApiErrorCode::as_str).collect();
    assert_eq!(schema(&doc, "ApiErrorCode")["enum"], json!(codes));
}

#[test]
fn the_types_json_is_valid_against_the_document() {
    let doc = doc();
    let mut samples: Vec<(&str, Value)> = super::types::golden::samples()
        .into_iter()
        .map(|(name, got, _)| (name, got))
        .collect();
    for (i, (event, _)) in crate::state::events::golden::samples()
        .into_iter()
        .enumerate()
    {
        let line = crate::state::events::Recorded {
            seq: i as u64 + 1,
            at_ms: 1,
            event,
        };
        samples.push(("EventLine", serde_json::to_value(line).unwrap()));
    }
    for (name, v) in samples {
        let r = json!({"$ref": format!("#/components/schemas/{name}")});
        if let Err(e) = check(&doc, &r, &v) {
            panic!("{name} {v} does not match openapi.json: {e}");
        }
    }
}

/// Validates `v` against `s` (`$ref`, `type`, `enum`, `const`, `oneOf`,
/// `properties`, `required`, `additionalProperties`, `items`, `minimum`,
/// `maximum`, `minLength`, `maxLength`, and `pattern`, which must be
/// [`NAME_PATTERN`] and is checked with `names::validate`).
fn check(doc: &Value, s: &Value, v: &Value) -> Result<(), String> {
    if let Some(r) = s["$ref"].as_str() {
        let name = r.trim_start_matches("#/components/schemas/");
        return check(doc, schema(doc, name), v);
    }
    if let Some(one) = s["oneOf"].as_array() {
        let n = one.iter().filter(|x| check(doc, x, v).is_ok()).count();
        if n != 1 {
            return Err(format!("{n} of oneOf match"));
        }
    }
    check_type(s, v)?;
    check_bounds(s, v)?;
    if let Some(e) = s["enum"].as_array()
        && !e.contains(v)
    {
        return Err(format!("{v} is not one of {e:?}"));
    }
    if !s["const"].is_null() && s["const"] != *v {
        return Err(format!("{v} is not {}", s["const"]));
    }
    match v {
        Value::Object(m) => check_object(doc, s, m),
        Value::Array(a) if s["items"].is_object() => a
            .iter()
            .try_for_each(|x| check(doc, &s["items"], x).map_err(|e| format!("[]: {e}"))),
        _ => Ok(()),
    }
}

fn check_bounds(s: &Value, v: &Value) -> Result<(), String> {
    if let (Some(min), Some(x)) = (s["minimum"].as_f64(), v.as_f64())
        && x < min
    {
        return Err(format!("{v} is below the minimum"));
    }
    if let (Some(max), Some(x)) = (s["maximum"].as_u64(), v.as_u64())
        && x > max
    {
        return Err(format!("{v} is above the maximum"));
    }
    let Some(text) = v.as_str() else {
        return Ok(());
    };
    let chars = text.chars().count() as u64;
    if s["minLength"].as_u64().is_some_and(|min| chars < min)
        || s["maxLength"].as_u64().is_some_and(|max| chars > max)
    {
        return Err(format!("{v} has a length out of bounds"));
    }
    if let Some(p) = s["pattern"].as_str() {
        assert_eq!(p, NAME_PATTERN, "the document's only pattern is the name's");
        names::validate("name", text).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn check_type(s: &Value, v: &Value) -> Result<(), String> {
    let is = |t: &str| match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "integer" => v.is_u64() || v.is_i64(),
        "number" => v.is_number(),
        "string" => v.is_string(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        _ => false,
    };
    let ok = match &s["type"] {
        Value::Null => true,
        Value::String(t) => is(t),
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).any(is),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{v} is not of type {}", s["type"]))
    }
}

fn check_object(doc: &Value, s: &Value, m: &Map<String, Value>) -> Result<(), String> {
    for k in s["required"].as_array().into_iter().flatten() {
        let k = k.as_str().unwrap_or_default();
        if !m.contains_key(k) {
            return Err(format!("required {k} is missing"));
        }
    }
    for (k, x) in m {
        match s["properties"].get(k) {
            Some(p) => check(doc, p, x),
            None if s["additionalProperties"] == Value::Bool(false) => {
                Err(format!("{k} is not a documented property"))
            }
            None if s["additionalProperties"].is_object() => {
                check(doc, &s["additionalProperties"], x)
            }
            None => Ok(()),
        }
        .map_err(|e| format!("{k}: {e}"))?;
    }
    Ok(())
}

/// Parameters and body fields that hold a user, VM, UA or session name
/// (a UA's version is a name too) when they are strings.
const NAME_KEYS: [&str; 7] = ["id", "user", "name", "session", "vm", "monitor", "version"];

/// The string query parameters that are not names.
const NOT_NAMES: [&str; 2] = ["entry", "force"];

fn assert_name(at: &str, s: &Value) {
    assert_eq!(s["pattern"], json!(NAME_PATTERN), "{at}: pattern");
    assert_eq!(s["maxLength"], json!(MAX_NAME_LEN), "{at}: maxLength");
    assert_eq!(s["minLength"], json!(1), "{at}: minLength");
}

/// The name fields of the request body schema `s` (following `$ref`).
fn body_names(doc: &Value, at: &str, s: &Value, seen: &mut usize) {
    if let Some(r) = s["$ref"].as_str() {
        let name = r.trim_start_matches("#/components/schemas/");
        return body_names(doc, &format!("{at} {name}"), schema(doc, name), seen);
    }
    for (k, p) in s["properties"].as_object().into_iter().flatten() {
        if NAME_KEYS.contains(&k.as_str()) && p["type"] == "string" {
            assert_name(&format!("{at}.{k}"), p);
            *seen += 1;
        }
    }
}

#[test]
fn every_name_carries_the_name_pattern() {
    let doc = doc();
    let mut seen = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let at = format!("{method} {path}");
            for p in op["parameters"].as_array().into_iter().flatten() {
                let (name, s) = (p["name"].as_str().unwrap(), &p["schema"]);
                let string = s["type"] == "string" && s["enum"].is_null();
                if string && !NOT_NAMES.contains(&name) {
                    assert!(NAME_KEYS.contains(&name), "{at}: is {name} a name?");
                    assert_name(&format!("{at} {name}"), s);
                    seen += 1;
                }
            }
            let body = &op["requestBody"]["content"]["application/json"]["schema"];
            body_names(&doc, &at, body, &mut seen);
        }
    }
    // 22 path parameters, 5 query parameters, 4 body fields.
    assert_eq!(seen, 31, "names found");
    let mut all = Vec::new();
    strings_of(&doc, "pattern", &mut |p| all.push(p.to_string()));
    assert!(all.iter().all(|p| p == NAME_PATTERN), "{all:?}");
}
