//! Checks a declaration and sorts its attributes into ours and the user's.

use syn::{
    Attribute, Expr, ExprLit, ExprPath, Lit, LitInt, LitStr, Meta, Path, Token,
    parse::{Parse, ParseStream},
    punctuated::Punctuated,
    spanned::Spanned,
};

use crate::parse::Decl;

/// The attributes `defstate!` reads; every other one is passed through.
const OURS: [&str; 6] = ["name", "version", "migrate", "alias", "journaled", "instastate"];

/// A declaration's attributes, sorted.
pub(crate) struct Attrs {
    /// `#[name = "..."]`, if given.
    pub(crate) name: Option<LitStr>,
    /// `#[version = N]`, if given.
    pub(crate) version: Option<Version>,
    /// The migrations of `#[migrate(...)]` that passed the checks.
    pub(crate) migrations: Vec<Migration>,
    /// Every `#[alias = "..."]` that passed the checks, in order.
    pub(crate) aliases: Vec<LitStr>,
    /// `#[journaled]`, if given.
    pub(crate) journaled: Option<Attribute>,
    /// `#[instastate(crate = path)]`, if given.
    pub(crate) krate: Option<Path>,
    /// Every other attribute, passed through to the `static`.
    pub(crate) rest: Vec<Attribute>,
    /// The attributes that decide whether the `static` exists (`cfg`, and
    /// `cfg_attr` holding only `cfg`): the registration gets them too.
    pub(crate) cfgs: Vec<Attribute>,
}

/// A schema version, as written in `#[version = N]` or before `=>` in `#[migrate]`.
pub(crate) struct Version {
    /// The version, at least 1.
    pub(crate) number: u32,
    /// The literal it was written as, for spans.
    pub(crate) lit: LitInt,
}

/// One `OLD => function` of `#[migrate(...)]`.
pub(crate) struct Migration {
    /// The version the function reads.
    pub(crate) from: Version,
    /// The function, of type `fn(Old) -> T`.
    pub(crate) function: ExprPath,
}

/// One `OLD => function` of `#[migrate(...)]` as written, before it is checked.
struct MigrationArg {
    from: LitInt,
    function: ExprPath,
}

/// `#[migrate(...)]` as written, checked against the cell's version once every
/// attribute has been read.
struct Migrate {
    attr: Attribute,
    args: Vec<MigrationArg>,
}

/// Every problem found in one declaration, combined into one error.
#[derive(Default)]
struct Errors(Option<syn::Error>);

impl Errors {
    fn push(&mut self, err: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(err),
            None => self.0 = Some(err),
        }
    }
}

/// Sorts `decl`'s attributes; every problem found is in the error, and the
/// attributes that were fine are still returned so that the `static` can be emitted.
pub(crate) fn validate(decl: &Decl) -> (Attrs, Option<syn::Error>) {
    let mut errors = Errors::default();
    if let Some(mutability) = &decl.mutability {
        errors.push(syn::Error::new_spanned(
            mutability,
            "state cells cannot be `static mut`: a cell locks itself, so declare it without `mut`",
        ));
    }
    let mut attrs = Attrs {
        name: None,
        version: None,
        migrations: Vec::new(),
        aliases: Vec::new(),
        journaled: None,
        krate: None,
        rest: Vec::new(),
        cfgs: Vec::new(),
    };
    let mut migrate: Option<Migrate> = None;
    let mut aliases: Vec<LitStr> = Vec::new();
    let mut bad_version = false;
    for attr in &decl.attrs {
        let path = attr.path();
        let res = if path.is_ident("name") {
            let parsed =
                non_empty_str(attr, "expected `#[name = \"...\"]` with a non-empty string");
            set_once(&mut attrs.name, parsed, attr, "a cell can have only one `#[name]`")
        } else if path.is_ident("version") {
            let parsed = version_value(attr);
            // A wrong version is reported once, not again at every migration.
            bad_version |= parsed.is_err();
            let message = "a cell can have only one `#[version]`";
            set_once(&mut attrs.version, parsed, attr, message)
        } else if path.is_ident("migrate") {
            let parsed = migrate_args(attr).map(|args| Migrate { attr: attr.clone(), args });
            let message = "a cell can have only one `#[migrate(...)]`; list every migration in it";
            set_once(&mut migrate, parsed, attr, message)
        } else if path.is_ident("alias") {
            const USAGE: &str =
                "expected `#[alias = \"...\"]` with a non-empty string, an older name of the cell";
            non_empty_str(attr, USAGE).map(|lit| aliases.push(lit))
        } else if path.is_ident("journaled") {
            let parsed = match &attr.meta {
                Meta::Path(_) => Ok(attr.clone()),
                other => Err(syn::Error::new_spanned(
                    other,
                    "expected `#[journaled]`, without arguments",
                )),
            };
            set_once(&mut attrs.journaled, parsed, attr, "a cell can have only one `#[journaled]`")
        } else if path.is_ident("instastate") {
            let message = "a cell can have only one `#[instastate(crate = ...)]`";
            set_once(&mut attrs.krate, crate_path(attr), attr, message)
        } else {
            pass_through(attr, &mut attrs)
        };
        if let Err(err) = res {
            errors.push(err);
        }
    }
    let version = attrs.version.as_ref().map_or(1, |it| it.number);
    if let Some(migrate) = migrate.filter(|_| !bad_version) {
        attrs.migrations = check_migrations(migrate, version, &mut errors);
    }
    attrs.aliases = check_aliases(aliases, attrs.name.as_ref(), &mut errors);
    (attrs, errors.0)
}

/// Stores `parsed` in `slot`, for an attribute that may be given once; the error
/// is `parsed`'s, or `message` at `attr` if `slot` is already set.
fn set_once<T>(
    slot: &mut Option<T>,
    parsed: syn::Result<T>,
    attr: &Attribute,
    message: &str,
) -> syn::Result<()> {
    let value = parsed?;
    if slot.is_some() {
        return Err(syn::Error::new_spanned(attr, message));
    }
    *slot = Some(value);
    Ok(())
}

/// Adds an attribute that is not ours to those of the `static`, and to the
/// registration's too if it decides whether the `static` exists.
fn pass_through(attr: &Attribute, attrs: &mut Attrs) -> syn::Result<()> {
    // On error the attribute is left off the `static` too, which would only repeat
    // the error.
    if existence(attr)? {
        attrs.cfgs.push(attr.clone());
    }
    attrs.rest.push(attr.clone());
    Ok(())
}

/// Whether `attr` decides whether the item exists: `cfg(...)`, or a `cfg_attr`
/// that applies only `cfg`s. Our own attributes inside `cfg_attr` are refused,
/// since the macro cannot see whether they apply.
fn existence(attr: &Attribute) -> syn::Result<bool> {
    if attr.path().is_ident("cfg") {
        return Ok(true);
    }
    if !attr.path().is_ident("cfg_attr") {
        return Ok(false);
    }
    let metas = attr.parse_args_with(Punctuated::<Meta, Token![,]>::parse_terminated)?;
    let applied: Vec<&Meta> = metas.iter().skip(1).collect();
    let ours = applied.iter().find_map(|meta| {
        let ident = meta.path().get_ident()?;
        OURS.iter().any(|it| ident == it).then_some((meta, ident))
    });
    if let Some((meta, ident)) = ours {
        return Err(syn::Error::new_spanned(
            meta,
            format!(
                "`#[{ident}]` cannot be inside `cfg_attr`; declare the cell twice under `#[cfg]` instead"
            ),
        ));
    }
    Ok(!applied.is_empty() && applied.iter().all(|meta| meta.path().is_ident("cfg")))
}

/// The string of `#[attr = "..."]`, which must not be empty; `usage` otherwise.
fn non_empty_str(attr: &Attribute, usage: &str) -> syn::Result<LitStr> {
    let Meta::NameValue(meta) = &attr.meta else {
        return Err(syn::Error::new_spanned(attr, usage));
    };
    let Expr::Lit(ExprLit { lit: Lit::Str(lit), .. }) = &meta.value else {
        return Err(syn::Error::new(meta.value.span(), usage));
    };
    if lit.value().is_empty() {
        return Err(syn::Error::new_spanned(lit, usage));
    }
    Ok(lit.clone())
}

fn version_value(attr: &Attribute) -> syn::Result<Version> {
    const USAGE: &str = "expected `#[version = N]` with an integer of at least 1";
    let Meta::NameValue(meta) = &attr.meta else {
        return Err(syn::Error::new_spanned(attr, USAGE));
    };
    let Expr::Lit(ExprLit { lit: Lit::Int(lit), .. }) = &meta.value else {
        return Err(syn::Error::new(meta.value.span(), USAGE));
    };
    to_version(lit, USAGE)
}

/// The version `lit` spells: a `u32` of at least 1, with no suffix but `u32`;
/// `usage` otherwise.
fn to_version(lit: &LitInt, usage: &str) -> syn::Result<Version> {
    let suffix = lit.suffix();
    if !matches!(suffix, "" | "u32") {
        return Err(syn::Error::new_spanned(
            lit,
            format!("{usage}; a version is a `u32`, so drop the `{suffix}` suffix"),
        ));
    }
    match lit.base10_parse::<u32>() {
        Ok(0) => Err(syn::Error::new_spanned(lit, usage)),
        Ok(number) => Ok(Version { number, lit: lit.clone() }),
        Err(_) => Err(syn::Error::new_spanned(
            lit,
            format!("{usage}; a version is a `u32`, and {lit} is too large for one"),
        )),
    }
}

/// The migrations of `#[migrate(OLD => function, ...)]`, unchecked.
fn migrate_args(attr: &Attribute) -> syn::Result<Vec<MigrationArg>> {
    let Meta::List(list) = &attr.meta else {
        return Err(syn::Error::new_spanned(attr, MigrationArg::USAGE));
    };
    let args = list.parse_args_with(Punctuated::<MigrationArg, Token![,]>::parse_terminated)?;
    if args.is_empty() {
        return Err(syn::Error::new_spanned(attr, MigrationArg::USAGE));
    }
    Ok(args.into_iter().collect())
}

impl MigrationArg {
    const USAGE: &str =
        "expected `#[migrate(OLD => function, ...)]`, as in `#[migrate(1 => from_v1)]`";
}

impl Parse for MigrationArg {
    fn parse(input: ParseStream<'_>) -> syn::Result<MigrationArg> {
        if !input.peek(LitInt) {
            return Err(input.error(MigrationArg::USAGE));
        }
        let from = input.parse()?;
        if !input.peek(Token![=>]) {
            return Err(input.error(MigrationArg::USAGE));
        }
        input.parse::<Token![=>]>()?;
        let function = input.parse().map_err(|_| input.error(MigrationArg::USAGE))?;
        Ok(MigrationArg { from, function })
    }
}

/// The migrations of `migrate` that read a valid version older than the cell's
/// `version`, at most one per version.
fn check_migrations(migrate: Migrate, version: u32, errors: &mut Errors) -> Vec<Migration> {
    if version < 2 {
        errors.push(syn::Error::new_spanned(
            &migrate.attr,
            "`#[migrate]` needs a `#[version = N]` above 1: migrations read older versions, and this cell is at version 1",
        ));
        return Vec::new();
    }
    let mut checked: Vec<Migration> = Vec::new();
    for MigrationArg { from, function } in migrate.args {
        let from = match to_version(&from, "expected a version of at least 1 before `=>`") {
            Ok(from) => from,
            Err(err) => {
                errors.push(err);
                continue;
            }
        };
        let number = from.number;
        if version <= number {
            errors.push(syn::Error::new_spanned(
                &from.lit,
                format!(
                    "cannot migrate from version {number}: migrations read versions older than the cell's `#[version = {version}]`"
                ),
            ));
        } else if checked.iter().any(|it| it.from.number == number) {
            errors.push(syn::Error::new_spanned(
                &from.lit,
                format!(
                    "a second migration from version {number}; give each version one migration"
                ),
            ));
        } else {
            checked.push(Migration { from, function });
        }
    }
    checked
}

/// The aliases, without those that repeat another or the cell's `#[name]`.
fn check_aliases(aliases: Vec<LitStr>, name: Option<&LitStr>, errors: &mut Errors) -> Vec<LitStr> {
    let mut checked: Vec<LitStr> = Vec::new();
    for alias in aliases {
        let value = alias.value();
        if name.is_some_and(|name| name.value() == value) {
            errors.push(syn::Error::new_spanned(
                &alias,
                format!(
                    "the alias `{value}` is the cell's own `#[name]`; an alias is an older name"
                ),
            ));
        } else if checked.iter().any(|it| it.value() == value) {
            errors.push(syn::Error::new_spanned(
                &alias,
                format!("the alias `{value}` is given twice"),
            ));
        } else {
            checked.push(alias);
        }
    }
    checked
}

fn crate_path(attr: &Attribute) -> syn::Result<Path> {
    let mut krate = None;
    attr.parse_nested_meta(|meta| {
        if meta.path.is_ident("crate") {
            if krate.is_some() {
                return Err(meta.error("`crate` is given twice"));
            }
            krate = Some(meta.value()?.parse::<Path>()?);
            Ok(())
        } else {
            Err(meta.error("expected `#[instastate(crate = path::to::instastate)]`"))
        }
    })?;
    krate.ok_or_else(|| {
        syn::Error::new_spanned(attr, "expected `#[instastate(crate = path::to::instastate)]`")
    })
}
