//! The grammar of `defstate!`: declarations separated by `;`.
//!
//! ```text
//! decl := attribute* visibility "static"? ("mut")? IDENT ":" TYPE "=" EXPR
//! ```

use proc_macro2::Span;
use quote::ToTokens;
use syn::{
    Attribute, Expr, Ident, Token, Type, Visibility,
    parse::{Parse, ParseStream},
};

pub(crate) struct Decls(pub(crate) Vec<Decl>);

pub(crate) struct Decl {
    pub(crate) attrs: Vec<Attribute>,
    pub(crate) vis: Visibility,
    pub(crate) mutability: Option<Token![mut]>,
    pub(crate) ident: Ident,
    pub(crate) ty: Type,
    pub(crate) init: Expr,
}

impl Parse for Decls {
    fn parse(input: ParseStream<'_>) -> syn::Result<Decls> {
        let mut decls = Vec::new();
        while !input.is_empty() {
            decls.push(input.parse()?);
            if input.is_empty() {
                break;
            }
            input.parse::<Token![;]>()?;
        }
        if decls.is_empty() {
            return Err(syn::Error::new(
                Span::call_site(),
                "expected at least one cell declaration, such as `COUNTER: u64 = 0`",
            ));
        }
        Ok(Decls(decls))
    }
}

impl Parse for Decl {
    fn parse(input: ParseStream<'_>) -> syn::Result<Decl> {
        let attrs = input.call(Attribute::parse_outer)?;
        let vis = input.parse()?;
        input.parse::<Option<Token![static]>>()?;
        let mutability = input.parse()?;
        let ident: Ident = input.parse()?;
        if !input.peek(Token![:]) {
            return Err(missing(
                input,
                &ident,
                format!(
                    "expected `:` and the cell's type after `{ident}`, as in `{ident}: u64 = 0`; a cell's type is never inferred"
                ),
            ));
        }
        input.parse::<Token![:]>()?;
        let ty: Type = input.parse()?;
        if !input.peek(Token![=]) {
            return Err(missing(
                input,
                &ty,
                format!(
                    "expected `=` and the initial value after the cell's type, as in `{ident}: u64 = 0`"
                ),
            ));
        }
        input.parse::<Token![=]>()?;
        let init = input.parse()?;
        Ok(Decl { attrs, vis, mutability, ident, ty, init })
    }
}

/// The error for a missing part of a declaration: at the token that stands where the
/// part should be, or at `before` (what came before the part) when nothing or only
/// the `;` ending the declaration does.
fn missing(input: ParseStream<'_>, before: &dyn ToTokens, message: String) -> syn::Error {
    if input.is_empty() || input.peek(Token![;]) {
        syn::Error::new_spanned(before, message)
    } else {
        input.error(message)
    }
}
