# List helpers of the stand-in library.
{ lib }:

rec {
  inherit (builtins)
    all
    any
    concatMap
    elem
    elemAt
    filter
    genList
    head
    length
    sort
    tail
    ;
  foldl' = builtins.foldl';
  foldr = op: nul: list: builtins.foldl' (acc: x: op x acc) nul (reverseList list);
  reverseList = list: builtins.genList (i: builtins.elemAt list (builtins.length list - 1 - i)) (builtins.length list);
  optional = condition: x: if condition then [ x ] else [ ];
  optionals = condition: list: if condition then list else [ ];
  toList = x: if builtins.isList x then x else [ x ];
  concatLists = builtins.concatLists;
  init = list: builtins.genList (builtins.elemAt list) (builtins.length list - 1);
  last = list: builtins.elemAt list (builtins.length list - 1);
  imap0 = f: list: builtins.genList (i: f i (builtins.elemAt list i)) (builtins.length list);
  imap1 = f: list: builtins.genList (i: f (i + 1) (builtins.elemAt list i)) (builtins.length list);
  unique = builtins.foldl' (acc: x: if builtins.elem x acc then acc else acc ++ [ x ]) [ ];
  count = pred: list: builtins.length (builtins.filter pred list);
  range = first: last: if first > last then [ ] else builtins.genList (i: first + i) (last - first + 1);
}
