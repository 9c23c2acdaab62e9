//! The console's read-only pages: the rollouts, a rollout (and its live
//! fragment), a target. Every page needs a session (any role); the buttons
//! are rendered only for a role the API would let take them.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method};
use axum::response::{Html, IntoResponse, Response};
use fleetpatch_proto::state::{RolloutState, TargetState};
use fleetpatch_store::{EventCursor, HeartbeatSummary, Progress, Rollout, TargetFilter};
use maud::{html, Markup, DOCTYPE};
use serde::Deserialize;
use uuid::Uuid;

use super::session::{session, Session, CSRF_FIELD};
use super::{age, ConsoleError, ConsoleState};
use crate::api::{parse_id, RolloutAction};
use crate::auth::required_role;

/// Rollouts on the list page.
const ROLLOUTS_SHOWN: u64 = 100;
/// Targets per page of a rollout's table.
const TARGETS_PAGE: u64 = 50;
/// Reasons shown in "failures by reason".
const REASONS_SHOWN: u64 = 20;
/// State changes and agent events per page of a target's timeline.
const TIMELINE_PAGE: u64 = 50;

/// The whole HTML document around a page's `main`.
pub(crate) fn document(title: &str, session: Option<&Session>, main: Markup) -> Html<String> {
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · fleetpatch" }
                link rel="stylesheet" href=(super::assets::STYLESHEET_PATH);
                script src=(super::assets::SCRIPT_PATH) defer {}
            }
            body {
                @if let Some(session) = session {
                    header.top {
                        a.brand href="/" { "fleetpatch" }
                        nav {
                            a href="/" { "Rollouts" }
                            @if may(session, &Method::POST, "/v1/rollouts") {
                                a href="/rollouts/new" { "New rollout" }
                            }
                        }
                        span.who { (session.identity.subject) " · " span.role { (session.identity.role.as_str()) } }
                        form.logout method="post" action="/logout" {
                            input type="hidden" name=(CSRF_FIELD) value=(session.csrf);
                            button type="submit" { "Log out" }
                        }
                    }
                }
                (main)
            }
        }
    };
    Html(page.into_string())
}

/// Whether the session's role may take `method route` by the API's rules.
pub(crate) fn may(session: &Session, method: &Method, route: &str) -> bool {
    session.identity.role >= required_role(method, route)
}

fn state_badge(state: &str) -> Markup {
    html! { span class={ "state state-" (state) } { (state) } }
}

fn finished(by_state: &BTreeMap<String, u64>) -> u64 {
    by_state.iter().filter(|(state, _)| state.parse::<TargetState>().is_ok_and(|s| s.is_final())).map(|(_, n)| n).sum()
}

fn bar(done: u64, total: u64) -> Markup {
    html! { progress value=(done) max=(total.max(1)) { (done) "/" (total) } }
}

// ------------------------------------------------------------------ rollouts

/// `GET /`: the newest rollouts with their state, progress per wave and age.
pub(crate) async fn rollouts(State(state): State<ConsoleState>, headers: HeaderMap) -> Result<Response, ConsoleError> {
    let session = session(&state, &headers, false).await?;
    let store = &state.api.store;
    let now = store.clock().now();
    let mut rows = Vec::new();
    for rollout in store.list_rollouts(ROLLOUTS_SHOWN).await? {
        let progress = store.progress(&rollout).await?;
        rows.push((rollout, progress));
    }
    let main = html! {
        main {
            h1 { "Rollouts" }
            @if rows.is_empty() {
                p { "No rollout yet." }
            } @else {
                table.rollouts {
                    thead { tr { th { "Name" } th { "State" } th { "Progress per wave" } th { "Targets" } th { "Age" } } }
                    tbody {
                        @for (rollout, progress) in &rows {
                            tr data-rollout=(rollout.id) {
                                td { a href={ "/rollouts/" (rollout.id) } { (rollout.name) } }
                                td { (state_badge(rollout.state.as_str())) }
                                td.waves {
                                    @for wave in &progress.waves {
                                        div.wave {
                                            span.wave-name { (wave.name) }
                                            (bar(finished(&wave.by_state), wave.total))
                                            span.count { (finished(&wave.by_state)) "/" (wave.total) }
                                        }
                                    }
                                }
                                td.num { (progress.total) }
                                td title=(rollout.created_at.to_rfc3339()) {
                                    (age((now - rollout.created_at).num_seconds()))
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(document("Rollouts", Some(&session), main).into_response())
}

// ------------------------------------------------------------------ a rollout

/// The filters and page of a rollout's targets table (query string).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct TargetsQuery {
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    wave: Option<String>,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    after: Option<u32>,
}

impl TargetsQuery {
    fn filter(&self) -> Result<TargetFilter, ConsoleError> {
        let blank =
            |value: &Option<String>| value.as_deref().map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned);
        let state = blank(&self.state)
            .map(|raw| raw.parse::<TargetState>().map_err(|error| ConsoleError::bad_request(format!("state: {error}"))))
            .transpose()?;
        let wave = blank(&self.wave)
            .map(|raw| {
                raw.parse::<u32>().map_err(|_| ConsoleError::bad_request(format!("wave: {raw:?} is not a wave number")))
            })
            .transpose()?;
        let label = blank(&self.label)
            .map(|raw| TargetFilter::parse_label(&raw).map_err(|error| ConsoleError::bad_request(error.to_string())))
            .transpose()?;
        Ok(TargetFilter { state, wave, label, host_contains: blank(&self.host) })
    }

    /// The query string of this filter on page `after`.
    fn link(&self, rollout: Uuid, after: Option<u32>) -> String {
        let mut parts = Vec::new();
        for (key, value) in [("state", &self.state), ("wave", &self.wave), ("label", &self.label), ("host", &self.host)]
        {
            if let Some(value) = value.as_deref().filter(|v| !v.is_empty()) {
                parts.push(format!("{key}={}", encode(value)));
            }
        }
        if let Some(after) = after {
            parts.push(format!("after={after}"));
        }
        if parts.is_empty() {
            format!("/rollouts/{rollout}")
        } else {
            format!("/rollouts/{rollout}?{}", parts.join("&"))
        }
    }
}

/// Percent-encodes a query value.
fn encode(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// `GET /rollouts/{id}`: the live summary, then the targets table.
pub(crate) async fn rollout(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<TargetsQuery>,
) -> Result<Response, ConsoleError> {
    let session = session(&state, &headers, false).await?;
    let id = parse_id(&id, "rollout")?;
    let filter = query.filter()?;
    let store = &state.api.store;
    let rollout = store.rollout(id).await?;
    let summary = summary(&state, &session, &rollout).await?;
    // One more than a page: whether there is a next page, without a count.
    let mut targets = store.targets_page(id, &filter, query.after, TARGETS_PAGE + 1).await?;
    let next = if targets.len() as u64 > TARGETS_PAGE {
        targets.truncate(TARGETS_PAGE as usize);
        targets.last().map(|t| t.ordinal)
    } else {
        None
    };
    let selected = |value: &Option<String>, option: &str| value.as_deref() == Some(option);
    let main = html! {
        main {
            p.crumbs { a href="/" { "Rollouts" } " › " }
            h1 { (rollout.name) }
            section #live data-live={ "/rollouts/" (id) "/live" } aria-live="polite" { (summary) }
            section.targets {
                h2 { "Targets" }
                form.filters method="get" action={ "/rollouts/" (id) } {
                    label { "State "
                        select name="state" {
                            option value="" { "any" }
                            @for target_state in TargetState::ALL {
                                option value=(target_state.as_str()) selected[selected(&query.state, target_state.as_str())] {
                                    (target_state.as_str())
                                }
                            }
                        }
                    }
                    label { "Wave "
                        select name="wave" {
                            option value="" { "any" }
                            @for (index, wave) in rollout.waves.iter().enumerate() {
                                option value=(index) selected[selected(&query.wave, &index.to_string())] { (wave.name) }
                            }
                        }
                    }
                    label { "Label " input type="text" name="label" placeholder="key=value" value=[query.label.as_deref()]; }
                    label { "Host " input type="search" name="host" placeholder="part of a name" value=[query.host.as_deref()]; }
                    button type="submit" { "Filter" }
                }
                table.targets {
                    thead { tr { th { "#" } th { "Host" } th { "Wave" } th { "State" } th { "Labels" } th { "Attempt" } th { "Error" } } }
                    tbody {
                        @for target in &targets {
                            tr {
                                td.num { (target.ordinal) }
                                td { a href={ "/targets/" (target.id) } { (target.host) } }
                                td { (rollout.waves.get(target.wave as usize).map(|w| w.name.as_str()).unwrap_or("?")) }
                                td { (state_badge(target.state.as_str())) }
                                td.labels { @for (key, value) in &target.labels { span.label { (key) "=" (value) } " " } }
                                td.num { (target.attempt) }
                                td.error { (target.error.as_deref().unwrap_or("")) }
                            }
                        }
                    }
                }
                @if targets.is_empty() { p { "No target matches." } }
                nav.paging {
                    @if query.after.is_some() { a href=(query.link(id, None)) { "« First page" } }
                    @if let Some(next) = next { a.next href=(query.link(id, Some(next))) { "Next page »" } }
                }
            }
        }
    };
    Ok(document(&rollout.name, Some(&session), main).into_response())
}

/// `GET /rollouts/{id}/live`: the summary alone, which the script fetches
/// every few seconds and swaps in (no page reload).
pub(crate) async fn live(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ConsoleError> {
    let session = session(&state, &headers, true).await?;
    let id = parse_id(&id, "rollout")?;
    let rollout = state.api.store.rollout(id).await?;
    Ok(Html(summary(&state, &session, &rollout).await?.into_string()).into_response())
}

/// The buttons a rollout in `state` offers, by the API's rules.
fn actions_for(rollout: &Rollout, progress: &Progress) -> Vec<RolloutAction> {
    let failures: u64 = progress
        .by_state
        .iter()
        .filter(|(state, _)| state.parse::<TargetState>().is_ok_and(|s| s.is_failure()))
        .map(|(_, n)| n)
        .sum();
    let mut actions = match rollout.state {
        RolloutState::Running | RolloutState::WaitingForWindow => vec![RolloutAction::Pause],
        RolloutState::Paused => vec![RolloutAction::Resume],
        RolloutState::AwaitingApproval => vec![RolloutAction::Approve],
        RolloutState::Aborted | RolloutState::Completed => vec![],
    };
    if failures > 0 {
        actions.push(RolloutAction::RetryFailed);
    }
    if !matches!(rollout.state, RolloutState::Aborted | RolloutState::Completed) {
        actions.push(RolloutAction::Abort);
    }
    actions
}

fn action_label(action: RolloutAction) -> &'static str {
    match action {
        RolloutAction::Pause => "Pause",
        RolloutAction::Resume => "Resume",
        RolloutAction::Approve => "Approve next wave",
        RolloutAction::Abort => "Abort",
        RolloutAction::RetryFailed => "Retry failed",
    }
}

/// State, buttons, counts per state, waves and failures by reason.
async fn summary(state: &ConsoleState, session: &Session, rollout: &Rollout) -> Result<Markup, ConsoleError> {
    let store = &state.api.store;
    let progress = store.progress(rollout).await?;
    let reasons = store.failure_reasons(rollout.id, REASONS_SHOWN).await?;
    let now = store.clock().now();
    let done = finished(&progress.by_state);
    let is_final = matches!(rollout.state, RolloutState::Aborted | RolloutState::Completed);
    let actions: Vec<RolloutAction> = actions_for(rollout, &progress)
        .into_iter()
        .filter(|action| may(session, &Method::POST, &action.api_route()))
        .collect();
    Ok(html! {
        div.summary data-state=(rollout.state.as_str()) data-final=(is_final) {
            p.status {
                (state_badge(rollout.state.as_str()))
                @if let Some(reason) = &rollout.pause_reason { " " span.reason { (reason) } }
                " · " span #done data-done=(done) { (done) } " of " (progress.total) " targets finished"
                " · created " (age((now - rollout.created_at).num_seconds())) " ago"
            }
            @if !actions.is_empty() {
                div.actions {
                    @for action in &actions {
                        form method="post" action={ "/rollouts/" (rollout.id) "/" (action.slug()) }
                            data-confirm={ (action_label(*action)) " rollout “" (rollout.name) "”?" } {
                            input type="hidden" name=(CSRF_FIELD) value=(session.csrf);
                            button type="submit" class={ "action action-" (action.slug()) } { (action_label(*action)) }
                        }
                    }
                }
            }
            div.counts {
                @for target_state in TargetState::ALL {
                    @let count = progress.by_state.get(target_state.as_str()).copied().unwrap_or(0);
                    @if count > 0 {
                        a class={ "count state-" (target_state.as_str()) }
                            href={ "/rollouts/" (rollout.id) "?state=" (target_state.as_str()) }
                            data-state=(target_state.as_str()) data-count=(count) {
                            span.n { (count) } " " (target_state.as_str())
                        }
                    }
                }
            }
            h2 { "Waves" }
            table.waves {
                @for wave in &progress.waves {
                    @let wave_done = finished(&wave.by_state);
                    tr data-wave=(wave.index) {
                        th { (wave.name) @if wave.index == rollout.current_wave && !is_final { " ◂" } }
                        td { (bar(wave_done, wave.total)) }
                        td.num { (wave_done) "/" (wave.total) }
                        td.states {
                            @for (wave_state, n) in &wave.by_state { span class={ "mini state-" (wave_state) } { (n) " " (wave_state) } " " }
                        }
                    }
                }
            }
            @if !reasons.is_empty() {
                h2 { "Failures by reason" }
                table.reasons {
                    @for reason in &reasons {
                        tr {
                            td.num { (reason.targets) }
                            td { (reason.reason.as_deref().unwrap_or("(no reason recorded)")) }
                        }
                    }
                }
            }
        }
    })
}

// ------------------------------------------------------------------ a target

#[derive(Debug, Default, Deserialize)]
pub(crate) struct TimelineQuery {
    /// Last state change of the previous page.
    #[serde(default)]
    moves_after: Option<i64>,
    /// `<attempt>.<seq>[.<instance>]` of the last agent event of the previous page.
    #[serde(default)]
    events_after: Option<String>,
}

/// `GET /targets/{id}`: the target, its patches (exit codes, output tails)
/// and its timeline (state changes and agent events), paged.
pub(crate) async fn target(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<TimelineQuery>,
) -> Result<Response, ConsoleError> {
    let session = session(&state, &headers, false).await?;
    let id = parse_id(&id, "target")?;
    let events_after = query
        .events_after
        .as_deref()
        .filter(|raw| !raw.is_empty())
        .map(|raw| {
            raw.parse::<EventCursor>().map_err(|error| ConsoleError::bad_request(format!("events_after: {error}")))
        })
        .transpose()?;
    let store = &state.api.store;
    let target = store.target(id).await?;
    let rollout = store.rollout(target.rollout_id).await?;
    let names: BTreeMap<u32, String> =
        store.patches(target.rollout_id).await?.into_iter().map(|p| (p.index, p.name)).collect();
    let patches = store.target_patches(id).await?;
    let mut moves = store.transitions_page(id, query.moves_after, TIMELINE_PAGE + 1).await?;
    let mut events = store.agent_events_page(id, events_after, TIMELINE_PAGE + 1).await?;
    let heartbeats = store.heartbeats(id).await?;
    let next_moves = (moves.len() as u64 > TIMELINE_PAGE).then(|| moves[TIMELINE_PAGE as usize - 1].id);
    moves.truncate(TIMELINE_PAGE as usize);
    let next_events = (events.len() as u64 > TIMELINE_PAGE)
        .then(|| EventCursor::after(&events[TIMELINE_PAGE as usize - 1]).to_string());
    events.truncate(TIMELINE_PAGE as usize);
    let main = html! {
        main {
            p.crumbs { a href="/" { "Rollouts" } " › " a href={ "/rollouts/" (rollout.id) } { (rollout.name) } " › " }
            h1 { (target.host) }
            dl.facts {
                dt { "State" } dd { (state_badge(target.state.as_str()))
                    @if let Some(verified) = &target.verified_state { " (verified: " (verified) ")" } }
                dt { "Wave" } dd { (rollout.waves.get(target.wave as usize).map(|w| w.name.as_str()).unwrap_or("?")) }
                dt { "Transport" } dd { (target.transport) @if let Some(port) = target.port { " :" (port) } }
                dt { "Attempt" } dd { (target.attempt) " (tries " (target.tries) ")" }
                dt { "Labels" } dd.labels { @for (key, value) in &target.labels { span.label { (key) "=" (value) } " " } }
                @if let Some(os) = &target.os { dt { "OS" } dd { (os) " " (target.arch.as_deref().unwrap_or("")) } }
                @if let Some(error) = &target.error { dt { "Error" } dd.error { (error) } }
            }
            h2 { "Patches" }
            table.patches {
                thead { tr { th { "Patch" } th { "State" } th { "Exit code" } th { "Outcome" } th { "Output (tail)" } } }
                tbody {
                    @for patch in &patches {
                        tr data-patch=(patch.patch_index) {
                            td { (names.get(&patch.patch_index).map(String::as_str).unwrap_or("?")) }
                            td { (state_badge(patch.state.as_str())) }
                            td.num.exit-code { @if let Some(code) = patch.exit_code { (code) } }
                            td { (patch.outcome.as_deref().unwrap_or("")) @if patch.reboot_required { " (reboot required)" }
                                 @if let Some(error) = &patch.error { " " span.error { (error) } } }
                            td { @if let Some(tail) = &patch.output_tail { pre.tail { (tail) } } }
                        }
                    }
                }
            }
            @if patches.is_empty() { p { "No patch recorded yet (the target was not probed)." } }
            h2 { "Timeline" }
            div.timeline {
                section {
                    h3 { "State changes" }
                    ol.moves {
                        @for entry in &moves {
                            li { time { (entry.transition.at.format("%Y-%m-%d %H:%M:%S")) } " "
                                (entry.transition.from) " → " (state_badge(&entry.transition.to))
                                @if let Some(detail) = &entry.transition.detail { " " span.detail { (detail) } } }
                        }
                    }
                    @if let Some(next) = next_moves {
                        a.next href={ "/targets/" (id) "?moves_after=" (next) } { "More state changes »" }
                    }
                }
                section {
                    h3 { "Agent events" }
                    ol.events {
                        @for event in &events {
                            li { time { (event.received_at.format("%Y-%m-%d %H:%M:%S")) } " "
                                "attempt " (event.attempt) " #" (event.seq) " " strong { (event.kind) }
                                @if let Some(index) = event.patch_index { " " (names.get(&index).map(String::as_str).unwrap_or("?")) }
                                @if let Some(code) = event.exit_code { " exit " (code) }
                                @if let Some(detail) = &event.detail { " " span.detail { (detail) } } }
                        }
                    }
                    @if events.is_empty() { p { "No agent event yet." } }
                    (heartbeat_summary(&heartbeats, &names))
                    @if let Some(next) = next_events {
                        a.next href={ "/targets/" (id) "?events_after=" (encode(&next)) } { "More events »" }
                    }
                }
            }
        }
    };
    Ok(document(&target.host, Some(&session), main).into_response())
}

/// One line per agent run: how many heartbeats moved the deadline, and the
/// last one (heartbeats are counted, not listed as events).
fn heartbeat_summary(heartbeats: &[HeartbeatSummary], names: &BTreeMap<u32, String>) -> Markup {
    html! {
        @if !heartbeats.is_empty() {
            ul.heartbeats {
                @for run in heartbeats {
                    li { "attempt " (run.attempt) " (agent " (run.agent_instance) "): " strong { (run.count) } " heartbeats, "
                        "the last at " time { (run.last_received_at.format("%Y-%m-%d %H:%M:%S")) } " (#" (run.last_seq)
                        @if let Some(index) = run.patch_index { ", during " (names.get(&index).map(String::as_str).unwrap_or("?")) }
                        ")" }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use fleetpatch_store::{AgentInstance, Role};

    use super::*;

    #[test]
    fn a_viewer_may_take_no_action_and_an_operator_every_one() {
        for action in RolloutAction::ALL {
            let needed = required_role(&Method::POST, &action.api_route());
            assert!(Role::Viewer < needed, "{action:?}");
            assert!(Role::Operator >= needed, "{action:?}");
        }
        assert!(Role::Viewer < required_role(&Method::POST, "/v1/rollouts"));
    }

    #[test]
    fn heartbeats_show_as_one_line_per_agent_run() {
        let at = |s: i64| chrono::DateTime::from_timestamp(1_800_000_000 + s, 0).expect("a time");
        let run = HeartbeatSummary {
            attempt: 2,
            agent_instance: AgentInstance(0xab),
            count: 41,
            last_seq: 44,
            patch_index: Some(1),
            first_received_at: at(0),
            last_received_at: at(1_230),
        };
        let names = BTreeMap::from([(1, "KB5030211 <x>".to_owned())]);
        let html = heartbeat_summary(&[run], &names).into_string();
        assert_eq!(
            html,
            "<ul class=\"heartbeats\"><li>attempt 2 (agent 00000000000000ab): <strong>41</strong> heartbeats, the last \
             at <time>2027-01-15 08:20:30</time> (#44, during KB5030211 &lt;x&gt;)</li></ul>"
        );
        assert_eq!(heartbeat_summary(&[], &names).into_string(), "");
    }

    #[test]
    fn filter_links_keep_the_filters_encoded() {
        let query = TargetsQuery {
            state: Some("failed".into()),
            label: Some("site=a b&c".into()),
            host: Some("".into()),
            ..TargetsQuery::default()
        };
        let id = Uuid::nil();
        assert_eq!(query.link(id, Some(7)), format!("/rollouts/{id}?state=failed&label=site%3Da+b%26c&after=7"));
    }
}
