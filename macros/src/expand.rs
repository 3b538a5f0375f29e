//! What `defstate!` becomes.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;

use crate::{
    parse::{Decl, Decls},
    validate::validate,
};

pub(crate) fn expand(Decls(decls): Decls) -> TokenStream {
    decls.iter().map(expand_one).collect()
}

fn expand_one(decl: &Decl) -> TokenStream {
    let (attrs, errors) = validate(decl);
    let Decl { vis, ident, ty, init, .. } = decl;
    let krate = attrs.krate.as_ref().map_or_else(|| quote!(::instastate), |path| quote!(#path));
    let ident_str = ident.to_string();
    let origin = quote!(::core::concat!(::core::module_path!(), "::", #ident_str));
    let name = match &attrs.name {
        Some(lit) => quote!(#lit),
        None => origin.clone(),
    };
    let rest = &attrs.rest;
    // `cfg` attributes must also remove the registration, or it would name a
    // `static` that does not exist.
    let cfgs = attrs.rest.iter().filter(|attr| attr.path().is_ident("cfg"));
    // Spanned at the type, so that a type that cannot be a cell is reported there.
    let register = quote_spanned! {ty.span()=>
        #krate::__private::register::<#ty>(&#ident)
    };
    let errors = errors.map(|err| err.to_compile_error());
    quote! {
        #errors
        #(#rest)*
        #vis static #ident: #krate::StateCell<#ty> =
            #krate::__private::new_cell(#name, #origin, || #init);
        #(#cfgs)*
        const _: () = {
            #krate::__private::ctor::declarative::ctor! {
                #[ctor(unsafe)]
                fn register() {
                    #register
                }
            }
        };
    }
}
