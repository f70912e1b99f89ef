//! The `before`/`after` diff an audit row carries: only the fields that changed.

use serde_json::{Map, Value};

/// Compare two JSON objects field by field. `None` when nothing changed.
pub fn diff(before: &Value, after: &Value) -> Option<Value> {
    let empty = Map::new();
    let b = before.as_object().unwrap_or(&empty);
    let a = after.as_object().unwrap_or(&empty);
    let mut old = Map::new();
    let mut new = Map::new();
    for (field, after_value) in a {
        let before_value = b.get(field).unwrap_or(&Value::Null);
        if before_value != after_value {
            old.insert(field.clone(), before_value.clone());
            new.insert(field.clone(), after_value.clone());
        }
    }
    for (field, before_value) in b {
        if !a.contains_key(field) {
            old.insert(field.clone(), before_value.clone());
            new.insert(field.clone(), Value::Null);
        }
    }
    if old.is_empty() { None } else { Some(serde_json::json!({ "before": old, "after": new })) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_changed_fields_appear() {
        let before = json!({"name": "a", "scopes": ["x:y"], "description": null, "gone": 1});
        let after = json!({"name": "b", "scopes": ["x:y"], "description": "d"});
        assert_eq!(
            diff(&before, &after),
            Some(json!({
                "before": {"name": "a", "description": null, "gone": 1},
                "after": {"name": "b", "description": "d", "gone": null}
            }))
        );
        assert_eq!(diff(&after, &after), None);
    }
}
