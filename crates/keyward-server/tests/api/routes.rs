//! The route table (`keyward_server::management_routes`, `service_routes`) names what each route
//! needs, and each handler's `Caller` type is held to it by the compiler. These tests hold the rest
//! to the table: every route of `/openapi.json` is in it (so `authz.rs`, which walks those routes,
//! checks every row), and the README's "What each route needs" is generated from it.

use std::collections::BTreeSet;

use keyward_server::auth::Reach;
use keyward_server::routes::{Needs, RouteRow};

const README: &str = include_str!("../../../../README.md");
const BEGIN: &str = "<!-- route-permissions: generated from the route table by tests/api/routes.rs -->\n";
const END: &str = "<!-- /route-permissions -->";

/// Every route, those that take a key first, in the order the table declares them.
fn rows() -> Vec<RouteRow> {
    let service = keyward_server::service_routes();
    let management = keyward_server::management_routes();
    let mut rows: Vec<RouteRow> = service.rows().iter().chain(management.rows()).copied().collect();
    rows.sort_by_key(|r| r.needs == Needs::Nothing);
    rows
}

fn needs(needs: Needs) -> String {
    match needs {
        Needs::Nothing => "no key".to_owned(),
        Needs::Key([]) => "any usable key".to_owned(),
        Needs::Key(grants) => grants
            .iter()
            .map(|g| match g.reach {
                Reach::OwnKeys => format!("`{}` for its own owner's keys", g.scope),
                Reach::Organization | Reach::Everywhere => format!("`{}`", g.scope),
            })
            .collect::<Vec<_>>()
            .join(", or "),
    }
}

fn table() -> String {
    let mut out = String::from("| route | needs |\n|---|---|\n");
    for r in rows() {
        out.push_str(&format!("| `{} {}` | {} |\n", r.verb.as_str(), r.path, needs(r.needs)));
    }
    out
}

#[test]
fn the_route_table_holds_every_documented_route_once() {
    let doc = serde_json::to_value(keyward_server::routes::openapi::document(&keyward_core::Plans::default())).unwrap();
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    // The document does not describe itself.
    documented.insert(("GET".to_owned(), "/openapi.json".to_owned()));
    let rows = rows();
    let declared: BTreeSet<_> = rows.iter().map(|r| (r.verb.as_str().to_owned(), r.path.to_owned())).collect();
    assert_eq!(declared.len(), rows.len(), "a route is declared twice");
    assert_eq!(declared, documented);
}

#[test]
fn the_readme_says_what_each_route_needs_as_the_route_table_declares_it() {
    let start = README.find(BEGIN).expect("README: the route-permissions marker") + BEGIN.len();
    let end = start + README[start..].find(END).expect("README: the end of the route-permissions table");
    let want = table();
    assert!(
        README[start..end] == want,
        "README.md's route-permissions table is not the route table's; it is:\n\n{want}"
    );
}
