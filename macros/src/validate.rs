//! Checks a declaration and sorts its attributes into ours and the user's.

use syn::{
    Attribute, Expr, ExprLit, Lit, LitStr, Meta, Path, Token, punctuated::Punctuated,
    spanned::Spanned,
};

use crate::parse::Decl;

/// A declaration's attributes, sorted.
pub(crate) struct Attrs {
    /// `#[name = "..."]`, if given.
    pub(crate) name: Option<LitStr>,
    /// `#[instastate(crate = path)]`, if given.
    pub(crate) krate: Option<Path>,
    /// Every other attribute, passed through to the `static`.
    pub(crate) rest: Vec<Attribute>,
    /// The attributes that decide whether the `static` exists (`cfg`, and
    /// `cfg_attr` holding only `cfg`): the registration gets them too.
    pub(crate) cfgs: Vec<Attribute>,
}

/// Sorts `decl`'s attributes; every problem found is in the error, and the
/// attributes that were fine are still returned so that the `static` can be emitted.
pub(crate) fn validate(decl: &Decl) -> (Attrs, Option<syn::Error>) {
    let mut errors: Option<syn::Error> = None;
    let mut push = |err: syn::Error| match &mut errors {
        Some(all) => all.combine(err),
        None => errors = Some(err),
    };
    if let Some(mutability) = &decl.mutability {
        push(syn::Error::new_spanned(
            mutability,
            "state cells cannot be `static mut`: a cell locks itself, so declare it without `mut`",
        ));
    }
    let mut attrs = Attrs { name: None, krate: None, rest: Vec::new(), cfgs: Vec::new() };
    for attr in &decl.attrs {
        if attr.path().is_ident("name") {
            match name_value(attr) {
                Ok(_) if attrs.name.is_some() => {
                    push(syn::Error::new_spanned(attr, "a cell can have only one `#[name]`"));
                }
                Ok(lit) => attrs.name = Some(lit),
                Err(err) => push(err),
            }
        } else if attr.path().is_ident("instastate") {
            match crate_path(attr) {
                Ok(_) if attrs.krate.is_some() => {
                    push(syn::Error::new_spanned(
                        attr,
                        "a cell can have only one `#[instastate(crate = ...)]`",
                    ));
                }
                Ok(path) => attrs.krate = Some(path),
                Err(err) => push(err),
            }
        } else {
            match existence(attr) {
                Ok(true) => attrs.cfgs.push(attr.clone()),
                Ok(false) => {}
                // Left off the `static` too, which would only repeat the error.
                Err(err) => {
                    push(err);
                    continue;
                }
            }
            attrs.rest.push(attr.clone());
        }
    }
    (attrs, errors)
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
    if let Some(ours) = applied
        .iter()
        .find(|meta| meta.path().is_ident("name") || meta.path().is_ident("instastate"))
    {
        return Err(syn::Error::new_spanned(
            ours,
            "`#[name]` and `#[instastate]` cannot be inside `cfg_attr`; declare the cell twice under `#[cfg]` instead",
        ));
    }
    Ok(!applied.is_empty() && applied.iter().all(|meta| meta.path().is_ident("cfg")))
}

fn name_value(attr: &Attribute) -> syn::Result<LitStr> {
    const USAGE: &str = "expected `#[name = \"...\"]` with a non-empty string";
    let Meta::NameValue(meta) = &attr.meta else {
        return Err(syn::Error::new_spanned(attr, USAGE));
    };
    let Expr::Lit(ExprLit { lit: Lit::Str(lit), .. }) = &meta.value else {
        return Err(syn::Error::new(meta.value.span(), USAGE));
    };
    if lit.value().is_empty() {
        return Err(syn::Error::new_spanned(lit, USAGE));
    }
    Ok(lit.clone())
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
