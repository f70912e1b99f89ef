//! What the two SQL backends share: statements written once, with `$1`-style placeholders (SQLite reads
//! them as PostgreSQL does), whose arguments are backend-neutral values ([`Arg`]); the rows they read
//! and how each row becomes a record ([`rows`]); and the one place that runs them ([`Db`]).
//!
//! A backend says only what differs between the databases ([`Dialect`]): how it encodes and decodes
//! the column types whose SQL types differ (ids: TEXT or `uuid`; times: fixed-width TEXT or
//! `timestamptz`; JSON: TEXT or `jsonb`; lists of strings: JSON TEXT or `text[]`), how its errors map
//! onto [`StoreError`], and the few clauses only one of them has (`FOR UPDATE`).

pub(crate) mod lifecycle;
pub(crate) mod rows;
pub(crate) mod store;
pub(crate) mod usage;
pub(crate) mod webhook;

use std::borrow::Cow;
use std::collections::HashSet;
use std::future::Future;

use chrono::{DateTime, NaiveDate, Utc};
use keyward_core::{KeyId, OrgId};
use serde_json::Value;
use sqlx::database::HasStatementCache;
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migrate, MigrateError, Migrator};
use sqlx::pool::PoolConnection;
use sqlx::query::Query;
use sqlx::{Database, Executor, FromRow, IntoArguments, Pool, QueryBuilder, Transaction};
use uuid::Uuid;

use self::rows::{ChainHead, ChainRow, DeliveryAttempt, HashOwner};
use crate::{
    ApiKey, Attempt, AuditEntry, Delivery, Event, KeyWithOrg, LimitOverrides, MigrationInfo, Organization, StoreError,
    StoreResult, Webhook,
};

/// A value bound to a statement, in the form the store thinks of it; each backend encodes it
/// ([`Dialect::arguments`]). `None` is SQL `NULL` of the column's type.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Arg {
    Id(Option<Uuid>),
    Time(Option<DateTime<Utc>>),
    Day(NaiveDate),
    Text(Option<String>),
    Int(Option<i64>),
    Bool(bool),
    Bytes(Vec<u8>),
    Json(Value),
    /// A list of strings (scopes, IP blocks, event names).
    List(Vec<String>),
}

macro_rules! arg_from {
    ($($ty:ty => |$v:ident| $arg:expr;)*) => {
        $(impl From<$ty> for Arg {
            fn from($v: $ty) -> Self {
                $arg
            }
        })*
    };
}

arg_from! {
    Uuid => |v| Arg::Id(Some(v));
    Option<Uuid> => |v| Arg::Id(v);
    KeyId => |v| Arg::Id(Some(v.0));
    Option<KeyId> => |v| Arg::Id(v.map(|id| id.0));
    OrgId => |v| Arg::Id(Some(v.0));
    DateTime<Utc> => |v| Arg::Time(Some(v));
    Option<DateTime<Utc>> => |v| Arg::Time(v);
    NaiveDate => |v| Arg::Day(v);
    &str => |v| Arg::Text(Some(v.to_owned()));
    String => |v| Arg::Text(Some(v));
    &String => |v| Arg::Text(Some(v.clone()));
    Option<&str> => |v| Arg::Text(v.map(str::to_owned));
    &Option<String> => |v| Arg::Text(v.clone());
    i64 => |v| Arg::Int(Some(v));
    Option<i64> => |v| Arg::Int(v);
    bool => |v| Arg::Bool(v);
    &Value => |v| Arg::Json(v.clone());
    Vec<String> => |v| Arg::List(v);
}

/// A key search by an index the store chooses, not the planner (SQLite's FTS5 tables: its planner has
/// no statistics on them; PostgreSQL's index of short substrings, whose expression the search's
/// predicate does not name): see `search_by_index` in [`store`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct SearchCandidates {
    /// The `api_keys` column that `select` gives, and the join that reads the candidates first, then
    /// each one's row.
    pub key: &'static str,
    pub join: &'static str,
    /// Appends a `SELECT` of one column, `k`, that the index answers: at least every key whose name or
    /// owner id holds the needle (ASCII letters in any case), perhaps more. Only for the needles
    /// [`Dialect::search_candidates`] gives it for.
    pub select: fn(&mut Stmt, &str),
    /// Where counting the candidates costs as much as they are many (a GIN index builds its whole
    /// bitmap of them before the first): appends a `SELECT` of one `bigint`, how many keys the
    /// database's statistics say hold the needle, so that a common one walks without counting them.
    pub estimate: Option<fn(&mut Stmt, &str)>,
}

/// The fewest characters a trigram index can look up; shorter needles need an index of their own
/// (migration 0012).
pub(crate) const TRIGRAM: usize = 3;

/// The `LIKE` pattern (with `\` as its escape character) matching any text that contains `needle`,
/// ASCII letters folded to lower case: `%` and `_` in the needle match only themselves.
pub(crate) fn contains_pattern(needle: &str) -> String {
    let mut pattern = String::with_capacity(needle.len() + 2);
    pattern.push('%');
    for c in needle.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c.to_ascii_lowercase());
    }
    pattern.push('%');
    pattern
}

/// A key's or an organization's limit overrides, in the order of `limit_columns!()`.
pub(crate) fn limit_args(limits: &LimitOverrides) -> [Arg; 4] {
    let LimitOverrides { rate_limit_per_minute, rate_limit_per_hour, rate_limit_per_day, monthly_request_limit } =
        *limits;
    [rate_limit_per_minute.into(), rate_limit_per_hour.into(), rate_limit_per_day.into(), monthly_request_limit.into()]
}

/// A statement and its arguments. Static SQL numbers its placeholders itself (`$1`, `$2`, ... in the
/// order of [`Stmt::arg`]); a statement built piece by piece appends them with [`Stmt::push_arg`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Stmt {
    /// Static SQL is not copied: most statements are, some run once per request or per key.
    sql: Cow<'static, str>,
    args: Vec<Arg>,
    /// Prepared for this run alone, not cached on the connection: PostgreSQL then plans it for its
    /// own arguments every time, where a cached statement may come to run one generic plan for all.
    one_shot: bool,
}

impl Stmt {
    pub(crate) fn new(sql: impl Into<Cow<'static, str>>) -> Self {
        Self { sql: sql.into(), args: Vec::new(), one_shot: false }
    }

    /// See [`Stmt::one_shot`](Stmt#structfield.one_shot).
    pub(crate) fn one_shot(&mut self) -> &mut Self {
        self.one_shot = true;
        self
    }

    /// The next argument, `$n` where `n` is how many came before plus one.
    pub(crate) fn arg(mut self, arg: impl Into<Arg>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// The next arguments, in order.
    pub(crate) fn args(mut self, args: impl IntoIterator<Item = Arg>) -> Self {
        self.args.extend(args);
        self
    }

    pub(crate) fn push(&mut self, sql: &str) -> &mut Self {
        self.sql.to_mut().push_str(sql);
        self
    }

    /// Appends the placeholder of a new argument.
    pub(crate) fn push_arg(&mut self, arg: impl Into<Arg>) -> &mut Self {
        self.args.push(arg.into());
        let placeholder = format!("${}", self.args.len());
        self.push(&placeholder)
    }

    /// Appends `a, b, ...`: one placeholder per argument.
    pub(crate) fn push_list(&mut self, args: impl IntoIterator<Item = Arg>) -> &mut Self {
        for (i, arg) in args.into_iter().enumerate() {
            if i > 0 {
                self.push(", ");
            }
            self.push_arg(arg);
        }
        self
    }

    /// Appends `(a, b, ...), (c, d, ...)`: one parenthesised list of placeholders per row.
    pub(crate) fn push_rows(&mut self, rows: impl IntoIterator<Item = Vec<Arg>>) -> &mut Self {
        for (i, row) in rows.into_iter().enumerate() {
            self.push(if i == 0 { "(" } else { ", (" });
            self.push_list(row);
            self.push(")");
        }
        self
    }
}

/// What one backend's database does differently from the other's; implemented for the sqlx database
/// types.
pub(crate) trait Dialect: Database {
    /// How the columns whose SQL types differ come back.
    type Id: Send + Unpin;
    type Time: Send + Unpin;
    type Json: Send + Unpin;
    type List: Send + Unpin;
    type Day: Send + Unpin;

    /// Appended to a `SELECT` that locks the rows it reads until the transaction ends (where the
    /// database has row locks; SQLite's writers are serialized instead).
    const FOR_UPDATE: &'static str;
    /// The same, skipping rows another transaction holds, so that nodes share out work.
    const SKIP_LOCKED: &'static str;
    /// The boolean literals as the schema's partial indexes spell them.
    const TRUE: &'static str;
    const FALSE: &'static str;

    /// `column`'s text with ASCII letters in lower case and every other character as it is: the same
    /// folding on both databases (PostgreSQL's `lower` folds all of Unicode, SQLite's only ASCII), so
    /// a search finds the same keys on either.
    fn ascii_lower(column: &str) -> String;

    /// How a key search by `needle` finds its keys by index; `None`: the planner does, from the search
    /// predicate itself (see `push_search` in [`store`]).
    fn search_candidates(needle: &str) -> Option<SearchCandidates>;

    /// The statement that brings the planner's statistics on the keys up to date, where the planner
    /// uses them; `None`: nothing to do.
    const ANALYZE_KEYS: Option<&'static str>;

    /// A driver error in terms a caller can act on.
    fn error(e: sqlx::Error) -> StoreError;

    fn rows_affected(done: &Self::QueryResult) -> u64;

    /// The arguments as this database takes them.
    fn arguments<'q>(args: Vec<Arg>) -> Result<Self::Arguments<'q>, BoxDynError>;

    fn read_id(v: Self::Id, column: &str) -> StoreResult<Uuid>;
    /// An id as it is hashed into the audit chain: the stored text, as it is.
    fn id_text(v: &Self::Id) -> String;
    fn read_time(v: Self::Time, column: &str) -> StoreResult<DateTime<Utc>>;
    fn read_json(v: Self::Json, column: &str) -> StoreResult<Value>;
    fn read_list(v: Self::List, column: &str) -> StoreResult<Vec<String>>;
    fn read_day(v: Self::Day, column: &str) -> StoreResult<NaiveDate>;

    /// sqlx's builder, built: its arguments' lifetime shortened to the borrow, which only the concrete
    /// types allow.
    fn build<'a: 'b, 'b>(q: &'b mut QueryBuilder<'a, Self>) -> Query<'b, Self, Self::Arguments<'b>>;
}

/// Backend `Self` reads a `T` from a row of shape [`Reads::Shape`] (see [`rows`]).
pub(crate) trait Reads<T>: Dialect {
    type Shape: for<'r> sqlx::FromRow<'r, <Self as Database>::Row> + Send + Unpin;
    fn record(row: Self::Shape) -> StoreResult<T>;
}

/// Runs statements. Implemented once, for every [`Dialect`].
pub(crate) trait Db: Dialect {
    /// Rows changed.
    fn execute(conn: &mut Self::Connection, stmt: Stmt) -> impl Future<Output = StoreResult<u64>> + Send;

    fn fetch_all<T: Send>(conn: &mut Self::Connection, stmt: Stmt) -> impl Future<Output = StoreResult<Vec<T>>> + Send
    where
        Self: Reads<T>;

    fn fetch_optional<T: Send>(
        conn: &mut Self::Connection,
        stmt: Stmt,
    ) -> impl Future<Output = StoreResult<Option<T>>> + Send
    where
        Self: Reads<T>;

    /// Runs a statement built with sqlx's own builder (bulk inserts whose arguments are arrays or
    /// long lists); the driver's error as it is, for the caller to look at.
    fn execute_built(
        conn: &mut Self::Connection,
        q: &mut QueryBuilder<'_, Self>,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send;

    fn fetch_built<T: Send>(
        conn: &mut Self::Connection,
        q: &mut QueryBuilder<'_, Self>,
    ) -> impl Future<Output = StoreResult<Vec<T>>> + Send
    where
        Self: Reads<T>;

    /// Applies every migration not applied yet (sqlx locks the database while it does, where it can).
    fn migrate_up(pool: &Pool<Self>, migrator: &'static Migrator) -> impl Future<Output = StoreResult<()>> + Send;

    /// Reverts the newest `steps` applied migrations.
    fn migrate_down(
        pool: &Pool<Self>,
        migrator: &'static Migrator,
        steps: u32,
    ) -> impl Future<Output = StoreResult<()>> + Send;

    /// Every migration this version knows, and whether it is applied.
    fn migration_status(
        pool: &Pool<Self>,
        migrator: &'static Migrator,
    ) -> impl Future<Output = StoreResult<Vec<MigrationInfo>>> + Send;

    /// The one row; `NotFound` without it.
    fn fetch_one<T: Send>(conn: &mut Self::Connection, stmt: Stmt) -> impl Future<Output = StoreResult<T>> + Send
    where
        Self: Reads<T>,
    {
        async { Self::fetch_optional(conn, stmt).await?.ok_or(StoreError::NotFound) }
    }
}

impl<D: Dialect + HasStatementCache> Db for D
where
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
    for<'q> D::Arguments<'q>: IntoArguments<'q, D>,
    D::Connection: Migrate,
{
    async fn execute_built(conn: &mut Self::Connection, q: &mut QueryBuilder<'_, Self>) -> Result<u64, sqlx::Error> {
        Ok(D::rows_affected(&D::build(q).execute(conn).await?))
    }

    async fn fetch_built<T: Send>(conn: &mut Self::Connection, q: &mut QueryBuilder<'_, Self>) -> StoreResult<Vec<T>>
    where
        Self: Reads<T>,
    {
        let rows = D::build(q).fetch_all(conn).await.map_err(D::error)?;
        rows.iter().map(|row| D::record(<D as Reads<T>>::Shape::from_row(row).map_err(D::error)?)).collect()
    }

    async fn migrate_up(pool: &Pool<Self>, migrator: &'static Migrator) -> StoreResult<()> {
        migrator.run(pool).await.map_err(migrate_error::<D>)
    }

    async fn migrate_down(pool: &Pool<Self>, migrator: &'static Migrator, steps: u32) -> StoreResult<()> {
        let mut applied = {
            let mut conn = pool.acquire().await.map_err(D::error)?;
            conn.ensure_migrations_table().await.map_err(migrate_error::<D>)?;
            conn.list_applied_migrations().await.map_err(migrate_error::<D>)?
        };
        applied.sort_by_key(|m| std::cmp::Reverse(m.version));
        // `undo` reverts every applied migration newer than the target: the newest one left standing.
        let target = applied.get(steps as usize).map_or(0, |m| m.version);
        migrator.undo(pool, target).await.map_err(migrate_error::<D>)
    }

    async fn migration_status(pool: &Pool<Self>, migrator: &'static Migrator) -> StoreResult<Vec<MigrationInfo>> {
        let applied: HashSet<i64> = {
            let mut conn = pool.acquire().await.map_err(D::error)?;
            conn.ensure_migrations_table().await.map_err(migrate_error::<D>)?;
            let applied = conn.list_applied_migrations().await.map_err(migrate_error::<D>)?;
            applied.into_iter().map(|m| m.version).collect()
        };
        Ok(migrator
            .iter()
            .filter(|m| m.migration_type.is_up_migration())
            .map(|m| MigrationInfo {
                version: m.version,
                description: m.description.to_string(),
                applied: applied.contains(&m.version),
            })
            .collect())
    }

    async fn execute(conn: &mut Self::Connection, stmt: Stmt) -> StoreResult<u64> {
        let done = sqlx::query_with::<D, _>(&stmt.sql, arguments::<D>(stmt.args)?)
            .persistent(!stmt.one_shot)
            .execute(conn)
            .await
            .map_err(D::error)?;
        Ok(D::rows_affected(&done))
    }

    async fn fetch_all<T: Send>(conn: &mut Self::Connection, stmt: Stmt) -> StoreResult<Vec<T>>
    where
        Self: Reads<T>,
    {
        let rows = query_as::<D, T>(&stmt.sql, stmt.args, stmt.one_shot)?.fetch_all(conn).await.map_err(D::error)?;
        rows.into_iter().map(D::record).collect()
    }

    async fn fetch_optional<T: Send>(conn: &mut Self::Connection, stmt: Stmt) -> StoreResult<Option<T>>
    where
        Self: Reads<T>,
    {
        let row =
            query_as::<D, T>(&stmt.sql, stmt.args, stmt.one_shot)?.fetch_optional(conn).await.map_err(D::error)?;
        row.map(D::record).transpose()
    }
}

/// A query reading rows of the shape `D` reads a `T` from.
fn query_as<'q, D, T>(
    sql: &'q str,
    args: Vec<Arg>,
    one_shot: bool,
) -> StoreResult<sqlx::query::QueryAs<'q, D, <D as Reads<T>>::Shape, D::Arguments<'q>>>
where
    D: Reads<T> + HasStatementCache,
    D::Arguments<'q>: IntoArguments<'q, D>,
{
    Ok(sqlx::query_as_with(sql, arguments::<D>(args)?).persistent(!one_shot))
}

fn arguments<'q, D: Dialect>(args: Vec<Arg>) -> StoreResult<D::Arguments<'q>> {
    D::arguments(args).map_err(|e| StoreError::Internal(format!("encoding a statement's arguments: {e}")))
}

fn migrate_error<D: Dialect>(e: MigrateError) -> StoreError {
    match e {
        MigrateError::Execute(inner) => D::error(inner),
        other => StoreError::Internal(format!("migration: {other}")),
    }
}

/// A backend's connections: for reads, and for writes (a transaction).
pub(crate) trait Backend: Send + Sync + 'static {
    /// `sqlite` or `postgres` ([`crate::Store::backend`]).
    const NAME: &'static str;

    /// Its database, which reads every record.
    type Db: Db
        + Reads<ApiKey>
        + Reads<KeyWithOrg>
        + Reads<Organization>
        + Reads<AuditEntry>
        + Reads<ChainRow<Self::Db>>
        + Reads<ChainHead>
        + Reads<Event>
        + Reads<Webhook>
        + Reads<Delivery>
        + Reads<Attempt>
        + Reads<DeliveryAttempt>
        + Reads<HashOwner>
        + Reads<Uuid>
        + Reads<i64>
        + Reads<bool>;

    /// A connection for reads.
    fn reader(&self) -> impl Future<Output = StoreResult<PoolConnection<Self::Db>>> + Send;

    /// A transaction for a change: writes from every process on the database see it whole or not at
    /// all.
    fn writer(&self) -> impl Future<Output = StoreResult<Transaction<'static, Self::Db>>> + Send;

    /// The schema's migrations, and the pool they run on.
    fn migrations(&self) -> (&'static Migrator, &Pool<Self::Db>);

    /// A read-only transaction whose reads all see one snapshot of the database.
    fn snapshot(&self) -> impl Future<Output = StoreResult<Transaction<'static, Self::Db>>> + Send;
}
