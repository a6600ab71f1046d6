# Checks that docs/dsl.md documents every public name of the DSL's expr.hpp.
#
#   cmake -DHEADER_DIR=<dsl/attnfuse or dsl> -DDOC=<docs/dsl.md> -P tests/docs_cover_dsl.cmake
#
# Names taken from expr.hpp (only what starts at column 0, i.e. at namespace
# scope; struct members and macro bodies are indented):
#   * functions:  `constexpr auto NAME(`
#   * objects:    `inline constexpr <type> NAME = ...` and `inline constexpr <type> NAME{...}`
#   * operators:  `constexpr auto operatorSYM(`, and a member `operator[]`
#   * names made by a macro whose body defines `constexpr auto PARAM(` or
#     `constexpr auto operator PARAM(`: the first argument of each use of the
#     macro at column 0 (`ATTNFUSE_UNARY_FUNCTION(exp, ...)`, `ATTNFUSE_BINARY_OPERATOR(+, ...)`).
# A name is covered when some `### ` heading of the document contains it: an
# identifier as a whole word, an operator as `operatorSYM` not followed by
# another operator character (so `operator<=` does not cover `operator<`).
# Fails listing every name without such a heading.

cmake_minimum_required(VERSION 3.25)  # the project's minimum; sets the policies of a -P script

if(NOT DEFINED HEADER_DIR OR NOT DEFINED DOC)
  message(FATAL_ERROR "usage: cmake -DHEADER_DIR=<dir holding expr.hpp> -DDOC=<docs/dsl.md> -P docs_cover_dsl.cmake")
endif()
if(EXISTS "${HEADER_DIR}/expr.hpp")
  set(header "${HEADER_DIR}/expr.hpp")
elseif(EXISTS "${HEADER_DIR}/attnfuse/expr.hpp")
  set(header "${HEADER_DIR}/attnfuse/expr.hpp")
else()
  message(FATAL_ERROR "docs_cover_dsl: no expr.hpp in HEADER_DIR=${HEADER_DIR} (nor in its attnfuse/)")
endif()
if(NOT EXISTS "${DOC}")
  message(FATAL_ERROR "docs_cover_dsl: DOC=${DOC} does not exist")
endif()

# CMake lists split on ';' and treat '[' ']' specially: neutralise them in
# both texts before anything becomes a list element.
function(neutralise out text)
  string(REPLACE ";" " " text "${text}")
  string(REPLACE "[" "@LB@" text "${text}")
  string(REPLACE "]" "@RB@" text "${text}")
  set(${out} "${text}" PARENT_SCOPE)
endfunction()

file(READ "${header}" source)
neutralise(source "${source}")
set(source "\n${source}")  # so that a name on the first line also starts after "\n"

set(identifiers "")  # function and object names
set(operators "")    # operator symbols (after neutralise: '[' ']' as @LB@ @RB@)

# ---- functions at namespace scope ----------------------------------------------
string(REGEX MATCHALL "\nconstexpr auto [A-Za-z_][A-Za-z0-9_]*\\(" found "${source}")
foreach(m IN LISTS found)
  string(REGEX REPLACE "\nconstexpr auto ([A-Za-z_][A-Za-z0-9_]*)\\(" "\\1" name "${m}")
  list(APPEND identifiers "${name}")
endforeach()

# ---- objects at namespace scope --------------------------------------------------
string(REGEX MATCHALL "\ninline constexpr [^\n=]*[^A-Za-z0-9_\n][A-Za-z_][A-Za-z0-9_]* *[={]" found "${source}")
foreach(m IN LISTS found)
  string(REGEX REPLACE ".*[^A-Za-z0-9_]([A-Za-z_][A-Za-z0-9_]*) *[={]$" "\\1" name "${m}")
  list(APPEND identifiers "${name}")
endforeach()

# ---- operators at namespace scope, and operator[] ---------------------------------
string(REGEX MATCHALL "\nconstexpr auto operator *[^A-Za-z0-9_ (\n][^A-Za-z0-9_ (\n]*\\(" found "${source}")
foreach(m IN LISTS found)
  string(REGEX REPLACE "\nconstexpr auto operator *([^(]*)\\(" "\\1" sym "${m}")
  list(APPEND operators "${sym}")
endforeach()
if(source MATCHES "constexpr auto [^\n(]*operator@LB@@RB@\\(")
  list(APPEND operators "@LB@@RB@")
endif()

# ---- names made by macros ----------------------------------------------------------
string(REGEX MATCHALL "\n#define [A-Za-z_][A-Za-z0-9_]*\\([A-Za-z_][A-Za-z0-9_]*" defines "${source}")
foreach(d IN LISTS defines)
  string(REGEX REPLACE "\n#define ([A-Za-z_][A-Za-z0-9_]*)\\(([A-Za-z_][A-Za-z0-9_]*)" "\\1" macro "${d}")
  string(REGEX REPLACE "\n#define ([A-Za-z_][A-Za-z0-9_]*)\\(([A-Za-z_][A-Za-z0-9_]*)" "\\2" param "${d}")
  # the macro's body: the #define line and every continuation line
  string(REGEX MATCH "\n#define ${macro}\\(([^\n]*\\\\\n)*[^\n]*" body "${source}")
  set(kind "")
  if(body MATCHES "constexpr auto operator *${param}\\(")
    set(kind operator)
  elseif(body MATCHES "constexpr auto ${param}\\(")
    set(kind function)
  endif()
  if(kind STREQUAL "")
    continue()
  endif()
  string(REGEX MATCHALL "\n${macro}\\([^,)\n]*" uses "${source}")
  foreach(u IN LISTS uses)
    string(REGEX REPLACE "\n${macro}\\( *([^,)\n]*[^ ,)\n]) *" "\\1" arg "${u}")
    if(kind STREQUAL "operator")
      list(APPEND operators "${arg}")
    else()
      list(APPEND identifiers "${arg}")
    endif()
  endforeach()
endforeach()

list(REMOVE_DUPLICATES identifiers)
list(REMOVE_DUPLICATES operators)
list(LENGTH identifiers identifier_count)
list(LENGTH operators operator_count)
math(EXPR total "${identifier_count} + ${operator_count}")
if(identifier_count LESS 10 OR operator_count LESS 5)
  message(FATAL_ERROR "docs_cover_dsl: found only ${identifier_count} names and ${operator_count} operators in "
                      "${header}; has its layout changed? (the script reads column-0 definitions)")
endif()

# ---- the document's ### headings ------------------------------------------------
file(READ "${DOC}" doc)
neutralise(doc "${doc}")
string(REGEX MATCHALL "(^|\n)### [^\n]*" headings "${doc}")

set(missing "")
foreach(name IN LISTS identifiers)
  set(covered FALSE)
  foreach(h IN LISTS headings)
    if(h MATCHES "(^|[^A-Za-z0-9_])${name}([^A-Za-z0-9_]|$)")
      set(covered TRUE)
      break()
    endif()
  endforeach()
  if(NOT covered)
    list(APPEND missing "${name}")
  endif()
endforeach()

foreach(sym IN LISTS operators)
  set(needle "operator${sym}")
  string(LENGTH "${needle}" needle_length)
  set(covered FALSE)
  foreach(h IN LISTS headings)
    set(rest "${h}")
    while(TRUE)
      string(FIND "${rest}" "${needle}" at)
      if(at EQUAL -1)
        break()
      endif()
      math(EXPR after "${at} + ${needle_length}")
      string(SUBSTRING "${rest}" ${after} 1 next)
      if(next STREQUAL "" OR NOT next MATCHES "[-+*/%^!<>=&|]")
        set(covered TRUE)
        break()
      endif()
      string(SUBSTRING "${rest}" ${after} -1 rest)
    endwhile()
    if(covered)
      break()
    endif()
  endforeach()
  if(NOT covered)
    string(REPLACE "@LB@" "[" shown "${needle}")
    string(REPLACE "@RB@" "]" shown "${shown}")
    list(APPEND missing "${shown}")
  endif()
endforeach()

if(missing)
  list(LENGTH missing missing_count)
  list(JOIN missing ", " missing_text)
  message(FATAL_ERROR "docs_cover_dsl: ${DOC} has no `### ...NAME...` heading for ${missing_count} of the ${total} "
                      "public names of ${header}: ${missing_text}")
endif()
string(REPLACE "@LB@" "[" shown_ops "${operators}")
string(REPLACE "@RB@" "]" shown_ops "${shown_ops}")
list(JOIN identifiers " " shown_ids)
list(JOIN shown_ops " " shown_ops)
message(STATUS "docs_cover_dsl: all ${total} public names of expr.hpp have a heading in ${DOC}")
message(STATUS "  names: ${shown_ids}")
message(STATUS "  operators: ${shown_ops}")
