//! Task ids (MCP 2025-11-25 tasks) namespaced per backend.
//!
//! Two backends may both call a task `1`, so the client sees `<server>+<taskId>` and the
//! relay turns it back into the backend's own id on the way in. Only the places the spec
//! puts a task id are rewritten: `result.task.taskId` (a task-augmented request's
//! `CreateTaskResult`), the `Task` a `tasks/get` or `tasks/cancel` returns, `tasks[]` of
//! `tasks/list`, `notifications/tasks/status`, and `_meta["io.modelcontextprotocol/related-task"]`
//! anywhere a backend puts it. Tool output that merely contains a `taskId` field is left alone.
//!
//! A session may only reach the tasks it created (the exposed ids are recorded in its
//! state), so one client cannot read or cancel another's task through a shared backend.

use serde_json::Value;
use serde_json::value::RawValue;

/// Separates the server name from the backend's task id (server names never contain it).
pub const SEPARATOR: char = '+';

/// The `_meta` key that links a message to a task.
pub const RELATED_TASK: &str = "io.modelcontextprotocol/related-task";

/// The id a client sees for `server`'s task `id`.
pub fn expose(server: &str, id: &str) -> String {
    format!("{server}{SEPARATOR}{id}")
}

/// `(server, backend task id)` of an exposed id.
pub fn resolve(exposed: &str) -> Option<(&str, &str)> {
    exposed
        .split_once(SEPARATOR)
        .filter(|(server, id)| !server.is_empty() && !id.is_empty())
}

/// Where the task ids of a result sit, by the request it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `CreateTaskResult`: `{task: {taskId}}` (a task-augmented request).
    Created,
    /// A `Task` itself: `{taskId, status, ...}` (`tasks/get`, `tasks/cancel`).
    Task,
    /// `{tasks: [Task]}` (`tasks/list`).
    List,
    /// Anything else: only a related-task `_meta` is rewritten.
    Other,
}

fn rename(slot: Option<&mut Value>, server: &str, found: &mut Vec<String>) {
    if let Some(v) = slot
        && let Some(id) = v.as_str()
    {
        let exposed = expose(server, id);
        found.push(exposed.clone());
        *v = Value::String(exposed);
    }
}

fn rename_related(payload: &mut Value, server: &str, found: &mut Vec<String>) {
    rename(
        payload
            .get_mut("_meta")
            .and_then(|m| m.get_mut(RELATED_TASK))
            .and_then(|r| r.get_mut("taskId")),
        server,
        found,
    );
}

/// Rewrites the task ids of a backend's result or params (`shape` says where they are).
/// Returns the new JSON and the exposed ids it now carries; `None` when there is nothing
/// to rewrite, so the original bytes pass through untouched.
pub fn namespace(
    server: &str,
    raw: &RawValue,
    shape: Shape,
) -> Option<(Box<RawValue>, Vec<String>)> {
    if shape == Shape::Other && !raw.get().contains(RELATED_TASK) {
        return None;
    }
    let mut v: Value = serde_json::from_str(raw.get()).ok()?;
    let mut found = Vec::new();
    match shape {
        Shape::Created => rename(
            v.get_mut("task").and_then(|t| t.get_mut("taskId")),
            server,
            &mut found,
        ),
        Shape::Task => rename(v.get_mut("taskId"), server, &mut found),
        Shape::List => {
            if let Some(list) = v.get_mut("tasks").and_then(Value::as_array_mut) {
                for t in list {
                    rename(t.get_mut("taskId"), server, &mut found);
                }
            }
        }
        Shape::Other => {}
    }
    rename_related(&mut v, server, &mut found);
    if found.is_empty() {
        return None;
    }
    Some((RawValue::from_string(v.to_string()).ok()?, found))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap_or_else(|_| unreachable!("test JSON is valid"))
    }

    #[test]
    fn exposes_and_resolves() {
        assert_eq!(expose("ev", "t-1"), "ev+t-1");
        assert_eq!(resolve("ev+t-1"), Some(("ev", "t-1")));
        assert_eq!(resolve("ev+a+b"), Some(("ev", "a+b")));
        assert_eq!(resolve("plain"), None);
        assert_eq!(resolve("+x"), None);
    }

    #[test]
    fn rewrites_only_where_the_spec_puts_task_ids() {
        let (out, ids) = namespace(
            "ev",
            &raw(r#"{"task":{"taskId":"1","status":"working"},"x-keep":{"taskId":"mine"}}"#),
            Shape::Created,
        )
        .unwrap_or_else(|| unreachable!("a created task is rewritten"));
        let v: Value = serde_json::from_str(out.get()).unwrap_or_default();
        assert_eq!(v["task"]["taskId"], "ev+1");
        assert_eq!(v["x-keep"]["taskId"], "mine");
        assert_eq!(ids, vec!["ev+1".to_owned()]);

        let (out, _) = namespace(
            "ev",
            &raw(r#"{"tasks":[{"taskId":"1"},{"taskId":"2"}]}"#),
            Shape::List,
        )
        .unwrap_or_else(|| unreachable!("a list is rewritten"));
        assert_eq!(
            out.get(),
            r#"{"tasks":[{"taskId":"ev+1"},{"taskId":"ev+2"}]}"#
        );

        let meta = format!(r#"{{"content":[],"_meta":{{"{RELATED_TASK}":{{"taskId":"7"}}}}}}"#);
        let (out, _) = namespace("ev", &raw(&meta), Shape::Other)
            .unwrap_or_else(|| unreachable!("related-task meta is rewritten"));
        assert!(out.get().contains(r#""taskId":"ev+7""#));

        // A tool result that merely has a `taskId` field passes through untouched.
        assert!(
            namespace(
                "ev",
                &raw(r#"{"structuredContent":{"taskId":"x"}}"#),
                Shape::Other
            )
            .is_none()
        );
    }
}
