//! The grammar of `defstate!`: declarations separated by `;`.
//!
//! ```text
//! decl := attribute* visibility "static"? ("mut")? IDENT ":" TYPE "=" EXPR
//! ```

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
            return Err(input.error("expected a cell declaration such as `COUNTER: u64 = 0`"));
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
        let ident = input.parse()?;
        input.parse::<Token![:]>()?;
        let ty = input.parse()?;
        input.parse::<Token![=]>()?;
        let init = input.parse()?;
        Ok(Decl { attrs, vis, mutability, ident, ty, init })
    }
}
